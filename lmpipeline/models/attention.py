"""Variable-length attention over padding-free packed rows ("lmp_varlen").

A packed micro-batch is one row of several examples (data/packing.collate_packed). On SDPA,
transformers keeps them apart with a dense [T, T] block mask built from position_ids every step,
which sends SDPA to its masked (slower) kernels and costs T^2 memory: the attention probe measured
TRL's padding-free SDPA getting slower as micro-batches grew. Here the boundaries go to the kernel
as cumulative lengths instead (cu_seq_lens, computed once per batch on the CPU by the collator), and
each example attends only to itself, causally:

- on CUDA, PyTorch's own flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`,
  torch >= 2.10; no flash-attn package needed);
- elsewhere (CPU tests), SDPA once per example: same result, slow, for correctness only.

Shared prefixes (DPO, data/preference.collate_pairs_shared): keys may differ from queries. A pair is
one run [prompt, chosen, rejected]; the queries are two segments, prompt+chosen and rejected, and the
rejected segment's keys are prompt+rejected, gathered by `kv_gather` (the row position each key of
the cu_seq_lens_k segments reads). Causality is aligned to the END of a segment (query i of a segment
of n queries and m keys sees keys 0 .. i + m - n), which is how the flash kernel aligns a shorter query
segment, so a rejected token sees the whole prompt and the rejected tokens before it, never chosen.
The prompt's keys and values are computed once; only these two small [keys, kv heads, head dim]
copies are made per layer.

Registered with transformers' AttentionInterface under `VARLEN`. No mask function is registered,
so transformers builds no mask at all for it (masking_utils returns None for unknown
implementations). A call without cu_seq_lens (an unpacked, right-padded batch or one sequence)
therefore runs plain causal SDPA, which is exact for right padding: a real token never sees a later
pad. Left-padded batches (batched generation) must not use this implementation; `attention_for`
chooses it only for training and the stage `switch`es the model back afterwards.

Tested: tests/unit/models/test_varlen_attention.py (CPU: packed == one example at a time, through
a whole model); tests/gpu/test_varlen_gpu.py (CUDA kernel == SDPA with the block mask).
"""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VARLEN = "lmp_varlen"
# Names accepted in `attn_implementation` for this backend.
VARLEN_NAMES = ("varlen", VARLEN)


@lru_cache(maxsize=1)
def _torch_varlen():
    """torch's varlen_attn and how its signature asks for causality (it changed after 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def kernel_available(device: torch.device | str | None = None) -> bool:
    """True where the fast path runs: a CUDA device the flash kernel supports (compute capability 8.0 or
    newer: Ampere, Ada, Hopper, Blackwell; not V100 or T4) and a torch with varlen_attn."""
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_cuda or _torch_varlen() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    varlen_attn, causal, gqa = _VARLEN
    n_rep = q.shape[1] // k.shape[1]
    extra = dict(causal)
    if n_rep > 1:
        if gqa:
            extra["enable_gqa"] = True
        else:  # an older signature without GQA: give every query head its key/value head
            k, v = _repeat_heads(k, n_rep), _repeat_heads(v, n_rep)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **extra)


def _per_example(q, k, v, cu_q, scale: float | None, dropout: float, cu_k=None) -> torch.Tensor:
    """Reference path: causal SDPA for each segment separately, [T, H, D] in and out. A segment with more
    keys than queries (`cu_k`) is causal from its end, as the kernel aligns it."""
    out = torch.empty_like(q)
    bounds_q = cu_q.tolist()
    bounds_k = bounds_q if cu_k is None else cu_k.tolist()
    for (s, e), (s_k, e_k) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
        qs = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        ks, vs = (t[s_k:e_k].transpose(0, 1).unsqueeze(0) for t in (k, v))
        n, m = e - s, e_k - s_k
        mask = None if n == m else torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           dropout_p=dropout, enable_gqa=qs.shape[1] != ks.shape[1])
        out[s:e] = o[0].transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, cu_seq_lens_k=None, max_length_k=None,
                             kv_gather=None, **kwargs):
    """transformers attention function. query [B, Hq, S, D], key/value [B, Hkv, S, D] ->
    ([B, S, Hq, D], None). Packed batches (B == 1 with cu_seq_lens_q) take the varlen kernel; with
    `kv_gather` the key segments (cu_seq_lens_k) are those row positions (shared prefixes, see above)."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} expects one packed row per micro-batch, got {query.shape[0]} rows")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    cu_q = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    cu_k, max_k = cu_q, max_length_q
    if kv_gather is not None:
        k, v = k.index_select(0, kv_gather), v.index_select(0, kv_gather)
        cu_k, max_k = cu_seq_lens_k.to(device=q.device, dtype=torch.int32), max_length_k
    if q.is_cuda and _VARLEN is not None and not (dropout and module.training):
        out = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, int(max_length_q), int(max_k),
                      scaling)
    else:
        out = _per_example(q, k, v, cu_q, scaling, dropout if module.training else 0.0,
                           cu_k=cu_k if kv_gather is not None else None)
    return out.unsqueeze(0), None


def register() -> None:
    """Make `VARLEN` a name transformers accepts (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


# Looked up once at import: the forward reads a plain global, which torch.compile traces without a break.
_VARLEN = _torch_varlen()


def _text_config(model):
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner, inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config


def unsupported_reason(model, max_seq_length: int) -> str | None:
    """Why this model cannot use varlen attention, or None. The kernel does plain causal softmax
    attention: no logit soft-capping, no sliding window shorter than a packed row, no custom masks."""
    _, config = _text_config(model)
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if window and uses_window and window < max_seq_length:
        return f"a sliding window of {window} tokens"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder architecture"
    return None


def attention_for(model, *, requested: str | None, packed: bool, max_seq_length: int) -> str | None:
    """The attention implementation a training run should use, or None to keep the model's own.

    `requested` is the config's attn_implementation. None/"auto": varlen when the batches are packed,
    the kernel is there and the architecture allows it. "varlen": always for packed batches (the
    per-example reference path off CUDA). Anything else is the user's explicit choice, kept."""
    if requested not in (None, "auto", *VARLEN_NAMES) or not packed:
        return None
    reason = unsupported_reason(model, max_seq_length)
    if reason:
        if requested in VARLEN_NAMES:
            log.warning("attn_implementation=varlen: this model has %s; keeping %s", reason,
                        _text_config(model)[1]._attn_implementation)
        return None
    if requested in (None, "auto") and not kernel_available():
        return None
    return VARLEN


def switch(model, implementation: str) -> str:
    """Set the model's attention implementation; returns the previous one (for `switch` back)."""
    inner, config = _text_config(model)
    previous = config._attn_implementation
    if implementation == VARLEN:
        register()
    inner.set_attn_implementation(implementation)
    return previous
