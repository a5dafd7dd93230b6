"""Bytes the engine allocates for a request set: what the memory estimator plans and what the engine
checks against the GPU before allocating.

    kv cache      2 (keys, values) x layers x slots x max_len x kv_heads x head_dim x dtype bytes
    slot state    per slot: the output tokens (int64) and log-probs (float32) of max_new tokens
    sampling      per slot and step, over the vocabulary: float32 logits, log-softmax and processed
                  logits, the sorted copy and its int64 order (top-k / top-p), the float64 CDF:
                  SAMPLING_BYTES_PER_LOGIT bytes each
    prefill       one pass of `prefill_tokens` padded tokens: hidden states, q/k/v, the MLP's
                  intermediate activations, and float32 logits of one token per prompt
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmpipeline.errors import UserError

SAMPLING_BYTES_PER_LOGIT = 4 * 5 + 8 * 2  # five float32 [slots, V] tensors, the int64 order, the float64 CDF
PREFILL_ACTIVATIONS = 6  # hidden-sized tensors alive at once in a layer (residual, norm, q, k, v, attention out)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, dtype_bytes: int) -> "ModelShape":
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.vocab_size, dtype_bytes)


@dataclass(frozen=True)
class GenerationMemory:
    kv_cache: int
    slot_state: int
    sampling: int
    prefill: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.slot_state + self.sampling + self.prefill


def kv_cache_bytes(shape: ModelShape, slots: int, max_len: int) -> int:
    return 2 * shape.layers * slots * max_len * shape.kv_heads * shape.head_dim * shape.dtype_bytes


def generation_bytes(shape: ModelShape, slots: int, max_len: int, max_new: int,
                     prefill_tokens: int = 8192) -> GenerationMemory:
    """The engine's allocations for `slots` sequences of at most `max_len` tokens (prompt + new)."""
    prefill_rows = max(1, min(slots, prefill_tokens))
    activations = prefill_tokens * (PREFILL_ACTIVATIONS * shape.hidden + 2 * shape.intermediate) * shape.dtype_bytes
    return GenerationMemory(
        kv_cache=kv_cache_bytes(shape, slots, max_len),
        slot_state=slots * max_new * (8 + 4),
        sampling=slots * shape.vocab * SAMPLING_BYTES_PER_LOGIT,
        prefill=activations + prefill_rows * shape.vocab * 4)


def engine_bytes(runner, slots: int, max_len: int, max_new: int, prefill_tokens: int) -> GenerationMemory:
    """generation_bytes for the model a DecoderRunner serves."""
    dtype_bytes = torch.empty((), dtype=runner.dtype).element_size()
    return generation_bytes(ModelShape.of(runner.body.config, dtype_bytes), slots, max_len, max_new, prefill_tokens)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(need: GenerationMemory, device: torch.device, *, slots: int, max_len: int) -> None:
    """UserError with the sizes when the engine's buffers would not fit the GPU's free memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need.total <= free:
        return
    per_slot = (need.kv_cache + need.slot_state + need.sampling) / slots
    fitting = int((free - need.prefill) // per_slot) if free > need.prefill else 0
    raise UserError(
        f"generation needs {_gib(need.total)} on {device} but {_gib(free)} is free: KV cache "
        f"{_gib(need.kv_cache)} ({slots} slots x {max_len} tokens), sampling buffers {_gib(need.sampling)}, "
        f"prefill {_gib(need.prefill)}, slot state {_gib(need.slot_state)}",
        hint=f"use at most {fitting} slots (generation batch size), or shorter prompts / max_new_tokens")
