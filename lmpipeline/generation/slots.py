"""The per-slot decoding state, on the device, and one decode step over it.

Every tensor has one row per slot and keeps its address for the life of the engine's cache, so the
step below can be captured once in a CUDA graph and replayed (graphs.py) or run eagerly (CPU). A
step feeds each slot's last token at its position, samples the next one, appends it and its
log-probability to the slot's output row, and marks the slot finished on an eos id or when it has
its max_new_tokens; a finished slot keeps computing (its row is only read back) but writes nothing.
"""

from __future__ import annotations

import torch

from lmpipeline.generation import sampling
from lmpipeline.generation.forward import DecoderRunner
from lmpipeline.generation.kv_cache import StaticKVCache

NO_EOS = -1  # padding of the eos table (no token has this id)


class SlotState:
    def __init__(self, slots: int, max_new: int, eos_width: int, device):
        long = dict(dtype=torch.long, device=device)
        self.slot_ids = torch.arange(slots, **long)
        self.tokens = torch.zeros(slots, **long)  # last sampled token, fed by the next step
        self.positions = torch.zeros(slots, **long)  # where that token goes in the cache
        self.count = torch.zeros(slots, **long)  # tokens generated so far
        self.max_new = torch.ones(slots, **long)
        self.finished = torch.ones(slots, dtype=torch.bool, device=device)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, **long)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.seed = torch.zeros(slots, **long)
        self.sample = torch.zeros(slots, **long)
        self.eos = torch.full((slots, max(eos_width, 1)), NO_EOS, **long)
        self.out_tokens = torch.zeros(slots, max_new, **long)
        self.out_logprobs = torch.zeros(slots, max_new, dtype=torch.float32, device=device)
        self.slots, self.max_new_cap = slots, max_new

    def fits(self, slots: int, max_new: int, eos_width: int) -> bool:
        return self.slots >= slots and self.max_new_cap >= max_new and self.eos.shape[1] >= eos_width

    def start(self, rows: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor, position: torch.Tensor) -> None:
        """Slots `rows` begin with their first token (sampled from the prefill's logits)."""
        self.tokens[rows] = token
        self.positions[rows] = position
        self.count[rows] = 1
        self.out_tokens[rows, 0] = token
        self.out_logprobs[rows, 0] = logprob
        self.finished[rows] = (token.unsqueeze(-1) == self.eos[rows]).any(-1) | (self.max_new[rows] <= 1)

    def step(self, runner: DecoderRunner, cache: StaticKVCache, b: int, mode: str) -> None:
        """One decode step for slots 0 .. b-1, entirely on the device (graph-capturable)."""
        s = slice(0, b)
        pos = self.positions[s]
        logits = runner.decode(cache, self.tokens[s], pos, self.slot_ids[s])
        u = sampling.uniform(self.seed[s], self.sample[s], pos + 1)
        tok, lp = sampling.choose(logits, self.temperature[s], self.top_k[s], self.top_p[s], u, mode)
        done = self.finished[s]
        at = self.count[s].clamp(max=self.max_new_cap - 1).unsqueeze(-1)
        out_t, out_lp = self.out_tokens[s], self.out_logprobs[s]
        out_t.scatter_(1, at, torch.where(done, out_t.gather(1, at).squeeze(-1), tok).unsqueeze(-1))
        out_lp.scatter_(1, at, torch.where(done, out_lp.gather(1, at).squeeze(-1), lp).unsqueeze(-1))
        count = self.count[s]
        count.add_((~done).long())
        hit = (tok.unsqueeze(-1) == self.eos[s]).any(-1)
        now_done = done | hit | (count >= self.max_new[s])
        self.tokens[s].copy_(torch.where(done, self.tokens[s], tok))
        self.positions[s].copy_(torch.where(done, pos, (pos + 1).clamp(max=cache.max_len - 1)))
        self.finished[s].copy_(now_done)
