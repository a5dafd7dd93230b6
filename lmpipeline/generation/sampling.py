"""Choosing the next token on the device: greedy, temperature, top-k, top-p, with the log-probability
of the chosen token under the distribution it was drawn from.

Every function takes per-row tensors (one row per slot), so one call serves a batch whose requests
use different settings, and nothing here reads a value back to the host: the decode step can be
captured in a CUDA graph and run many steps between host checks.

The distribution actually sampled from, row by row (the order transformers' warpers apply):
    logits / temperature -> keep the top_k largest (top_k 0: all) -> keep the smallest set of the
    most likely tokens whose mass reaches top_p (top_p 1: all) -> softmax.
A greedy row (temperature 0) takes the argmax of the raw logits and reports its log-probability under
the model's own distribution (softmax of the raw logits), which is what a teacher-forced pass gives.

Randomness is counter-based: a row's uniform number is a hash of (seed, sample index, position of
the token), so a request's samples depend on its seed only, never on which slot it landed in, what
else shared its batch or how many steps ran between host checks. The draw is inverse-CDF sampling
(one uniform per row, float64 cumulative sum) rather than Gumbel noise over the whole vocabulary,
which would cost a vocabulary-sized hash per row per step.
"""

from __future__ import annotations

import torch

GREEDY, SAMPLE, FILTER = "greedy", "sample", "filter"  # what a batch needs: argmax, softmax, sort too

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    # A logical shift on int64 (torch's >> is arithmetic): drop the copied sign bits.
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele, Lea, Flood 2014): a bijective int64 -> int64 scramble."""
    x = x * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform(seed: torch.Tensor, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One float64 in (0, 1) per row, a function of (seed, sample index, token position) only."""
    h = mix64(mix64(mix64(seed) + sample) + position)
    return (_shift_right(h, 11).double() + 0.5) / float(1 << 53)


def seed_key(seed: int) -> int:
    """A request's seed as the int64 the hash starts from."""
    return _signed(int(seed) & _MASK64)


def processed_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits of the distribution sampled from, the vocabulary id of each of their positions).

    SAMPLE: logits / temperature in vocabulary order (ids None). FILTER: sorted descending, filtered
    entries -inf, with the vocabulary id of each sorted position."""
    scaled = logits / temperature.unsqueeze(-1)
    if mode != FILTER:
        return scaled, None
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(ordered.shape[-1], device=ordered.device)
    k = torch.where(top_k > 0, top_k, ordered.shape[-1])
    ordered = ordered.masked_fill(rank.unsqueeze(0) >= k.unsqueeze(-1), float("-inf"))
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    nucleus = top_p.unsqueeze(-1)
    ordered = ordered.masked_fill((mass_before >= nucleus) & (nucleus < 1.0), float("-inf"))
    return ordered, order


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           u: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B], their log-probabilities [B]) for float32 logits [B, V].

    `temperature` [B] (0: greedy row), `top_k` [B] long, `top_p` [B], `u` [B] uniforms from `uniform`."""
    raw = torch.log_softmax(logits, dim=-1)
    greedy_tok = logits.argmax(-1)
    greedy_lp = raw.gather(-1, greedy_tok.unsqueeze(-1)).squeeze(-1)
    if mode == GREEDY:
        return greedy_tok, greedy_lp
    is_greedy = temperature <= 0
    temp = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    dist, order = processed_logits(logits, temp, top_k, top_p, mode)
    logp = torch.log_softmax(dist, dim=-1)
    if order is not None:
        # Back to vocabulary order: a CDF over sorted order would hand u to another token whenever
        # two nearly equal logits swap places (a rounding difference between batches).
        logp = torch.empty_like(logp).scatter_(-1, order, logp)
    cdf = logp.exp().double().cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    lp = logp.gather(-1, tok).squeeze(-1)
    return torch.where(is_greedy, greedy_tok, tok.squeeze(-1)), torch.where(is_greedy, greedy_lp, lp)


def batch_mode(params) -> str:
    """The cheapest path that serves every request of a run (a list of SamplingParams)."""
    sampled = [p for p in params if p.temperature > 0]
    if not sampled:
        return GREEDY
    return FILTER if any(p.top_k > 0 or p.top_p < 1.0 for p in sampled) else SAMPLE
