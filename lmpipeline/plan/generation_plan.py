"""The GPU memory of a stage that generates (eval's golden-set answers; `generate` and `chat` alike):
the model's weights in the inference dtype (never 4-bit: inference runs adapters on full-precision
weights) plus what the generation engine allocates for its slots (lmpipeline/generation/memory.py:
KV cache, slot state, sampling buffers, one prefill pass).

Prompt lengths are not read here: a slot is planned for the longest training row of the config (its
max_seq_length, the prompts come from the same data) plus max_new_tokens, an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmpipeline.config.presets import Architecture
from lmpipeline.generation.memory import GenerationMemory, ModelShape, generation_bytes
from lmpipeline.plan import hardware

DEFAULT_PROMPT_TOKENS = 2048  # no training stage to take max_seq_length from


@dataclass
class GenerationPlan:
    name: str
    weights: float
    engine: GenerationMemory
    slots: int
    max_len: int
    device: hardware.GPU | None = None

    @property
    def peak(self) -> float:
        return self.weights + self.engine.total

    @property
    def fits(self) -> bool | None:
        return None if self.device is None else hardware.fits(self.peak, self.device)

    def as_dict(self) -> dict:
        gib = hardware.GIB
        return {"stage": self.name, "kind": "generation", "slots": self.slots, "max_len": self.max_len,
                "memory": {"peak_gib": round(self.peak / gib, 3),
                           "parts_gib": {"weights": round(self.weights / gib, 3),
                                         "kv cache": round(self.engine.kv_cache / gib, 3),
                                         "sampling buffers": round(self.engine.sampling / gib, 3),
                                         "prefill": round(self.engine.prefill / gib, 3),
                                         "slot state": round(self.engine.slot_state / gib, 3)}},
                "gpu": None if self.device is None else {"name": self.device.name, "fits": self.fits}}


def plan_generation(name: str, arch: Architecture, *, slots: int, max_new_tokens: int, prompt_tokens: int,
                    dtype_bytes: int = 2, device: hardware.GPU | None = None) -> GenerationPlan:
    shape = ModelShape(arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
                       arch.head_dim, arch.vocab_size, dtype_bytes)
    max_len = prompt_tokens + max_new_tokens
    engine = generation_bytes(shape, slots, max_len, max_new_tokens, prefill_tokens=min(8192, slots * prompt_tokens))
    return GenerationPlan(name, arch.total_params * dtype_bytes, engine, slots, max_len, device)
