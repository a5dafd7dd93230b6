"""The batched sampling engine: requests in, completions out, continuous batching over fixed slots.

    engine = GenerationEngine(model, tokenizer, max_slots=64)
    [[completion, ...n], ...] = engine.generate([Request(prompt_ids, SamplingParams(...)), ...])

Scheduling. The KV cache has a fixed number of slots (kv_cache.py). Requests wait in a queue, in
order; a request is admitted when its n samples find n free slots (the lowest free ones, so the
active slots stay packed at the front and the decode step runs over a small bucket). Admitted
prompts are prefilled together (right padded, up to `prefill_tokens` padded tokens per pass), each
prompt once: its keys and values are copied into its other n - 1 slots, and every sample draws its
first token from the same logits. Then the decode step runs `sync_every` times on the device (a CUDA
graph replay per step on a GPU, graphs.py; eager elsewhere) before the host reads back which slots
finished (eos ids and max_new_tokens are checked on the device) and checks stop strings on the
decoded text; finished slots are completed and refilled from the queue. A slot that finishes between
two reads idles at most `sync_every` - 1 steps.

Everything sampling needs (settings, seeds, eos ids) lives in per-slot device tensors (slots.py), so
one batch mixes requests with different settings; the whole run uses the cheapest sampling path
that serves them all (sampling.batch_mode).

Models outside forward.FAMILIES run through fallback.py (model.generate) with the same interface;
the engine logs that once. During a run the model is in generation mode (modes.py): training
speed-ups off, restored afterwards.

Raises UserError: invalid settings, a request with more samples than slots, a request set whose
cache does not fit the GPU (with the sizes, memory.py), stop strings without a tokenizer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmpipeline.errors import UserError
from lmpipeline.generation import memory, sampling
from lmpipeline.generation.fallback import generate_with_hf
from lmpipeline.generation.forward import DecoderRunner, rope_reads_positions_on_host, unsupported_reason
from lmpipeline.generation.graphs import DecodeGraphs, bucket_for, buckets
from lmpipeline.generation.modes import generation_mode
from lmpipeline.generation.params import LENGTH, STOP, Completion, Request
from lmpipeline.generation.slots import SlotState
from lmpipeline.generation.stop import eos_cut, find_stop_string, visible_text

log = logging.getLogger(__name__)

# on_tokens(request index, sample index, new token ids): called as tokens are read back (streaming)
TokenCallback = Callable[[int, int, list[int]], None]


@dataclass
class _Live:
    request: int
    sample: int
    checked: int = 0  # tokens already searched for stop strings
    streamed: int = 0  # tokens already passed to on_tokens


class GenerationEngine:
    """See the module docstring. `cuda_graphs`: None captures graphs on a CUDA device."""

    def __init__(self, model, tokenizer=None, *, max_slots: int = 64, sync_every: int | None = None,
                 cuda_graphs: bool | None = None, prefill_tokens: int = 8192, seed: int = 0):
        if max_slots < 1:
            raise UserError(f"the engine needs at least one slot, got max_slots={max_slots}")
        self.model, self.tokenizer = model, tokenizer
        self.max_slots, self.prefill_tokens, self.seed = max_slots, prefill_tokens, seed
        self.reason = unsupported_reason(model)
        self.runner = DecoderRunner(model) if self.reason is None else None
        on_cuda = self.runner is not None and self.runner.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        if self.cuda_graphs and rope_reads_positions_on_host(model):
            log.info("generation: this model's RoPE scaling reads positions on the host; decoding without CUDA graphs")
            self.cuda_graphs = False
        self.sync_every = sync_every or (16 if on_cuda else 4)
        self._cache = self._state = None
        self._graphs: dict[str, DecodeGraphs] = {}
        self.stats: dict[str, float] = {}
        if self.reason:
            log.warning("generation: %s is not served by the engine (%s); using model.generate, which is slower",
                        type(model).__name__, self.reason)

    # ------------------------------------------------------------------------------------ public

    def generate(self, requests: Sequence[Request], on_tokens: TokenCallback | None = None) -> list[list[Completion]]:
        """For each request, its n completions (in request order)."""
        requests = list(requests)
        if not requests:
            return []
        if any(r.params.stop for r in requests) and self.tokenizer is None:
            raise UserError("stop strings need the tokenizer: pass one to GenerationEngine")
        max_len = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        reason = self.reason or unsupported_reason(self.model, max_len)
        with generation_mode(self.model), torch.inference_mode():
            if reason:
                return generate_with_hf(self.model, self._decode, requests, seed=self.seed, on_tokens=on_tokens)
            return self._run(requests, max_len, on_tokens)

    # ------------------------------------------------------------------------------------ set-up

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _prepare(self, slots: int, max_len: int, max_new: int, eos_width: int, mode: str) -> None:
        """Cache, slot state and graphs for this run: kept from the last run when they are big enough."""
        runner = self.runner
        cache_ok = self._cache is not None and self._cache.fits(slots, max_len, runner.dtype, runner.device)
        state_ok = self._state is not None and self._state.fits(slots, max_new, eos_width)
        if not (cache_ok and state_ok):
            self._cache = self._state = None
            self._graphs = {}
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
            need = memory.engine_bytes(runner, slots, max_len, max_new, self.prefill_tokens)
            memory.check_fits(need, runner.device, slots=slots, max_len=max_len)
            self._cache = runner.new_cache(slots, max_len)
            self._state = SlotState(slots, max_new, eos_width, runner.device)
        self._state.finished.fill_(True)
        if self.cuda_graphs and mode not in self._graphs:
            graphs = DecodeGraphs(lambda b, m: self._state.step(runner, self._cache, b, m), self._state.slots, mode)
            graphs.capture()
            self._graphs[mode] = graphs
            self.stats["capture_seconds"] = self.stats.get("capture_seconds", 0.0) + graphs.capture_seconds

    # ------------------------------------------------------------------------------------ the run

    def _run(self, requests: list[Request], max_len: int, on_tokens: TokenCallback | None) -> list[list[Completion]]:
        t0 = time.perf_counter()
        total = sum(r.params.n for r in requests)
        slots = min(self.max_slots, total)
        widest = max(r.params.n for r in requests)
        if widest > slots:
            raise UserError(f"a request asks for {widest} samples but the engine has {slots} slots",
                            hint=f"give the engine at least {widest} slots (max_slots)")
        mode = sampling.batch_mode([r.params for r in requests])
        self._prepare(slots, max_len, max(r.params.max_new_tokens for r in requests),
                      max(len(r.params.eos_ids) for r in requests), mode)
        state = self._state
        sizes = buckets(state.slots)
        queue, free = deque(range(len(requests))), list(range(slots))
        active: dict[int, _Live] = {}
        counts = [0] * state.slots
        results: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
        steps = 0
        first_token = None
        while queue or active:
            admitted = []
            while queue and len(free) >= requests[queue[0]].params.n:
                i = queue.popleft()
                take, free = free[:requests[i].params.n], free[requests[i].params.n:]
                admitted.append((i, take))
            if admitted:
                self._admit(requests, admitted, active, counts, mode)
                if first_token is None:
                    if state.tokens.is_cuda:
                        torch.cuda.synchronize()
                    first_token = time.perf_counter() - t0
            remaining = max(requests[live.request].params.max_new_tokens - counts[s] for s, live in active.items())
            top = max(active) + 1
            b = bucket_for(top, sizes)
            for _ in range(max(0, min(self.sync_every, remaining))):
                if self.cuda_graphs:
                    self._graphs[mode].replay(b)
                else:
                    state.step(self.runner, self._cache, b, mode)
                steps += 1
            for s in self._read_back(requests, active, counts, top, results, on_tokens):
                del active[s]
                free.append(s)
            free.sort()
        self.stats.update(first_token_seconds=first_token or 0.0, decode_steps=steps,
                          run_seconds=time.perf_counter() - t0)
        return results  # type: ignore[return-value]

    def _admit(self, requests, admitted, active, counts, mode: str) -> None:
        """Prefill the admitted prompts and start their slots with a first token each."""
        state, cache, runner = self._state, self._cache, self.runner
        for chunk in self._prefill_chunks(requests, admitted):
            prompts = [requests[i].prompt_ids for i, _ in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), width, dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, :len(p)] = torch.tensor(p)
            lengths = torch.tensor([len(p) for p in prompts])
            dev = runner.device
            logits = runner.prefill(cache, ids.to(dev), lengths.to(dev),
                                    torch.tensor([take[0] for _, take in chunk], device=dev))
            rows, per_row, row_len = [], [], []
            for (i, take), n in zip(chunk, lengths.tolist()):
                cache.copy_prefix(take[0], take[1:], n)
                for k, slot in enumerate(take):
                    rows.append(slot)
                    per_row.append((i, k))
                    row_len.append(n)
                    active[slot] = _Live(i, k)
                    counts[slot] = 1
            self._set_params(requests, rows, per_row)
            r = torch.tensor(rows, device=dev)
            row_logits = logits.repeat_interleave(torch.tensor([len(t) for _, t in chunk], device=dev), dim=0)
            positions = torch.tensor(row_len, device=dev)
            u = sampling.uniform(state.seed[r], state.sample[r], positions)
            tok, lp = sampling.choose(row_logits, state.temperature[r], state.top_k[r], state.top_p[r], u, mode)
            state.start(r, tok, lp, positions)

    def _prefill_chunks(self, requests, admitted):
        """Admitted requests in prefill passes of at most `prefill_tokens` padded tokens (one at least)."""
        chunk, width = [], 0
        for item in sorted(admitted, key=lambda a: len(requests[a[0]].prompt_ids)):
            n = len(requests[item[0]].prompt_ids)
            if chunk and max(width, n) * (len(chunk) + 1) > self.prefill_tokens:
                yield chunk
                chunk, width = [], 0
            chunk.append(item)
            width = max(width, n)
        if chunk:
            yield chunk

    def _set_params(self, requests, rows: list[int], per_row: list[tuple[int, int]]) -> None:
        state, dev = self._state, self.runner.device
        params = [requests[i].params for i, _ in per_row]
        r = torch.tensor(rows, device=dev)
        state.temperature[r] = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        state.top_k[r] = torch.tensor([p.top_k for p in params], device=dev)
        state.top_p[r] = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        seeds = [sampling.seed_key(p.seed if p.seed is not None else self.seed + i) for (i, _), p in zip(per_row, params)]
        state.seed[r] = torch.tensor(seeds, device=dev)
        state.sample[r] = torch.tensor([k for _, k in per_row], device=dev)
        state.max_new[r] = torch.tensor([p.max_new_tokens for p in params], device=dev)
        eos = torch.full((len(rows), state.eos.shape[1]), -1, dtype=torch.long)
        for row, p in enumerate(params):
            eos[row, :len(p.eos_ids)] = torch.tensor(p.eos_ids, dtype=torch.long)
        state.eos[r] = eos.to(dev)

    def _read_back(self, requests, active, counts, top, results, on_tokens) -> list[int]:
        """One host read: complete the finished slots (eos, length or stop string); stream new tokens."""
        state = self._state
        finished = state.finished[:top].tolist()
        new_counts = state.count[:top].tolist()
        for s in active:
            counts[s] = new_counts[s]
        wanted = [s for s, live in active.items()
                  if finished[s] or on_tokens is not None or requests[live.request].params.stop]
        if not wanted:
            return []
        idx = torch.tensor(wanted, device=state.tokens.device)
        width = max(counts[s] for s in wanted)
        tokens = state.out_tokens[idx, :width].tolist()
        done: dict[int, tuple[int, str | None]] = {}  # slot -> (tokens kept, text when cut by a stop string)
        for s, toks in zip(wanted, tokens):
            live, params = active[s], requests[active[s].request].params
            toks = toks[:counts[s]]
            keep, cut_text = len(toks), None
            if params.stop:
                hit = find_stop_string(self._decode, toks, params.stop, live.checked)
                live.checked = len(toks)
                if hit is not None:
                    keep, cut_text = hit
            if on_tokens is not None and keep > live.streamed:
                on_tokens(live.request, live.sample, toks[live.streamed:keep])
                live.streamed = keep
            if finished[s] or cut_text is not None:
                done[s] = (keep, cut_text)
        if done:
            slots = list(done)
            lps = state.out_logprobs[torch.tensor(slots, device=idx.device), :width].tolist()
            stopped = [s for s in slots if done[s][1] is not None and not finished[s]]
            if stopped:  # still decoding on the device: mark finished so it writes nothing more
                state.finished[torch.tensor(stopped, device=idx.device)] = True
            for s, lp in zip(slots, lps):
                live, params = active[s], requests[active[s].request].params
                keep, cut_text = done[s]
                toks = tokens[wanted.index(s)][:keep]
                if cut_text is not None:
                    reason, text = STOP, cut_text
                else:
                    reason = STOP if eos_cut(toks, params.eos_ids) == len(toks) else LENGTH
                    text = visible_text(self._decode, toks, params.eos_ids)
                results[live.request][live.sample] = Completion(toks, text, lp[:keep], reason)
        return list(done)
