"""What goes into the engine and what comes out: requests, their sampling settings, completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from lmpipeline.errors import UserError

STOP, LENGTH = "stop", "length"  # finish reasons: an eos id or stop string, or max_new_tokens reached


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    temperature 0 is greedy decoding (top_k / top_p then do not apply). top_k 0 and top_p 1 switch
    those filters off. `eos_ids` end a sample (the id is kept in the completion's tokens); a stop
    string ends it too (the text stops before it, the tokens at the one that completed it). `n`
    samples share the prompt's prefill. `seed` (None: the engine's seed plus the request's index)
    makes the samples reproducible whatever else is in the batch."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n (samples per prompt) must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise UserError("invalid sampling settings: " + "; ".join(problems))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))


@dataclass
class Request:
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if not self.prompt_ids:
            raise UserError("a generation request needs at least one prompt token")


@dataclass
class Completion:
    """One sample of one request. `logprobs[i]` is log p(token_ids[i]) under the distribution it was
    drawn from (greedy: the model's own softmax)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # STOP or LENGTH

    @property
    def finished(self) -> bool:
        return self.finish_reason == STOP
