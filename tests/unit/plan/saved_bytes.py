"""Measure what autograd saves per token in one decoder layer, on CPU, with saved_tensors_hooks.

The memory estimator's layer model (lmpipeline/plan/estimate.py::_layer_terms) is checked against this:
every tensor autograd packs while layer 1 of a 2-layer model runs its forward, counted once per storage,
parameters (and views of them) left out.
"""

from __future__ import annotations

import torch


def build(config, *, lora: dict | None, dtype, uncast: bool = False):
    """`uncast`: PEFT's LoRA input casts off, as lmpipeline trains under autocast (models/speedups.py)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        for m in model.modules():
            if uncast and hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    model.train()
    return model


def _layers(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def saved_bytes_per_token(model, tokens: int, *, mask: bool, autocast: bool, layer: int = 1) -> float:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int | None, int]] = {}
    current = {"layer": None}
    hooks = []
    for i, block in enumerate(_layers(model)):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("layer", i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__("layer", None)))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (current["layer"], t.untyped_storage().nbytes())
        return t

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens))
    kwargs = {}
    if mask:  # left padding: transformers builds a 4D mask and SDPA gets it
        kwargs["attention_mask"] = torch.cat([torch.zeros(1, 2, dtype=torch.long),
                                              torch.ones(1, tokens - 2, dtype=torch.long)], dim=1)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            model(input_ids=ids, use_cache=False, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return sum(n for lay, n in seen.values() if lay == layer) / tokens
