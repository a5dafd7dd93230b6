"""The model's forward pass for generation, written against the Hugging Face model's own modules.

Embedding, each layer's norms, q/k/v/o projections, rotary embedding and MLP, the final norm and the
LM head are the model's modules, called directly: PEFT LoRA layers (and 4/8-bit bases) stay active
exactly as trained, nothing is merged or copied. Only attention is ours: over the static KV cache
(kv_cache.py) with torch's scaled_dot_product_attention, on the CPU and the GPU alike.

- prefill: prompts right padded to one length, causal SDPA (exact for right padding: a real token
  never sees a later pad), keys and values written into the prompts' slots, logits of each prompt's
  last token only.
- decode: one token per slot for the first B slots; a slot attends to cache positions 0 .. its
  position (a length mask). Grouped-query heads are folded into the query length, [B, kv_heads,
  group, head_dim], so no key or value is repeated.

Families: Llama, Mistral, Qwen2, Qwen3 (query/key norms) without attention soft-capping and without a
sliding window shorter than the sequences, on one device. `unsupported_reason` says why any other model is not
served here (the engine then falls back to model.generate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmpipeline.generation.kv_cache import StaticKVCache
from lmpipeline.models import attention

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def causal_lm(model):
    """The *ForCausalLM under PEFT and wrapper modules."""
    return attention._text_config(model)[0]


def unsupported_reason(model, max_len: int | None = None) -> str | None:
    """Why this model cannot run here, or None (`max_len`: the longest sequence of a run, for windows)."""
    lm = causal_lm(model)
    cfg = lm.config
    placed = set((getattr(lm, "hf_device_map", None) or {}).values())
    if len(placed) > 1:  # accelerate moves activations between devices in hooks the engine does not run
        return f"weights spread over {len(placed)} devices ({', '.join(map(str, sorted(placed, key=str)))})"
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (served natively: {', '.join(FAMILIES)})"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len is not None and window < max_len:
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is None or any(t != "full_attention" for t in layer_types):
            return f"a sliding window of {window} tokens"
    body = getattr(lm, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or any(not hasattr(body, n) for n in needed):
        return "a decoder without embed_tokens/layers/norm/rotary_emb"
    return None


def rope_reads_positions_on_host(model) -> bool:
    """Dynamic and long-context RoPE scaling recompute frequencies from max(position) on the host each
    call, which a CUDA graph cannot replay: such models decode eagerly."""
    params = getattr(causal_lm(model).config, "rope_parameters", None) or {}
    kind = str(params.get("rope_type", "default")) if isinstance(params, dict) else "default"
    return "dynamic" in kind or kind == "longrope"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D], cos/sin [B, S, D] from the model's rotary embedding module."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class DecoderRunner:
    """prefill / decode for one model over a StaticKVCache (see the module docstring)."""

    def __init__(self, model):
        lm = causal_lm(model)
        cfg = lm.config
        self.body = lm.model
        self.lm_head = lm.get_output_embeddings()
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.kv_heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.vocab_size = self.lm_head.weight.shape[0]
        self.dtype = self.body.embed_tokens.weight.dtype
        self.device = self.body.embed_tokens.weight.device

    def new_cache(self, slots: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(len(self.layers), slots, max_len, self.kv_heads, self.head_dim,
                             dtype=self.dtype, device=self.device)

    def _qkv(self, attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = h.shape
        q = attn.q_proj(h).view(b, s, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(b, s, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, s, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMS norm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _mlp_block(self, layer, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body.norm(h)).float()

    def prefill(self, cache: StaticKVCache, ids: torch.Tensor, lengths: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        """ids [P, S] right padded, lengths [P], target slots [P] -> last-token logits [P, V] (fp32)."""
        p, s = ids.shape
        positions = torch.arange(s, device=ids.device).unsqueeze(0).expand(p, s)
        h = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(h, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            cache.write_prefix(i, slots, k, v)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=self.scaling,
                                               enable_gqa=self.group > 1)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(p, s, -1))
            h = self._mlp_block(layer, h)
        last = h[torch.arange(p, device=h.device), lengths - 1]
        return self._logits(last)

    def decode(self, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
        """One token per slot for slots 0 .. B-1: tokens, positions [B] -> logits [B, V] (fp32)."""
        b = tokens.shape[0]
        h = self.body.embed_tokens(tokens.unsqueeze(1))  # [B, 1, hidden]
        cos, sin = self.body.rotary_emb(h, positions.unsqueeze(1))
        visible = (torch.arange(cache.max_len, device=tokens.device).unsqueeze(0) <= positions.unsqueeze(1))
        mask = visible[:, None, None, :]  # [B, 1, 1, max_len]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            cache.write_step(i, slots, positions, k[:, 0], v[:, 0])
            keys, values = cache.layer_view(i, b)
            q = q.view(b, self.kv_heads, self.group, self.head_dim)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            h = h + attn.o_proj(o.reshape(b, 1, -1))
            h = self._mlp_block(layer, h)
        return self._logits(h[:, 0])
