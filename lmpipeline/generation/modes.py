"""Generation mode: the training speed-ups off while a model generates, every one back as it was after.

A model may be mid-training when it samples (an online RL step samples from the policy, then trains
on the samples), so `generation_mode` records and undoes exactly what training switched on, and puts
back exactly that:
- train/eval mode, module by module (dropout off while sampling);
- gradient checkpointing (the layers' `gradient_checkpointing` flags);
- varlen attention over packed rows (models/attention.py): back to SDPA, which left-padded
  batches of the model.generate fallback need;
- PEFT's LoRA input casts switched off under autocast (models/speedups.py);
- compiled decoder layers (models/compile.py), compiled for training's shapes;
- config.use_cache, which training turns off.
Nothing else is touched; parameters and their requires_grad are never changed.
"""

from __future__ import annotations

from contextlib import contextmanager

from lmpipeline.models import attention
from lmpipeline.models.compile import decoder_layers


def _set(modules, attr: str, value) -> None:
    for m in modules:
        setattr(m, attr, value)


@contextmanager
def generation_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    uncast = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", True) is False]
    compiled = [(layer, layer._compiled_call_impl) for layer in (decoder_layers(model) or [])
                if getattr(layer, "_compiled_call_impl", None) is not None]
    _, config = attention._text_config(model)
    use_cache = getattr(config, "use_cache", None)
    previous_attention = None
    try:
        model.eval()
        _set(checkpointed, "gradient_checkpointing", False)
        _set(uncast, "cast_input_dtype_enabled", True)
        _set([layer for layer, _ in compiled], "_compiled_call_impl", None)
        if config._attn_implementation == attention.VARLEN:
            previous_attention = attention.switch(model, "sdpa")
        config.use_cache = True
        yield model
    finally:
        if previous_attention is not None:
            attention.switch(model, previous_attention)
        config.use_cache = use_cache
        for layer, impl in compiled:
            layer._compiled_call_impl = impl
        _set(uncast, "cast_input_dtype_enabled", False)
        _set(checkpointed, "gradient_checkpointing", True)
        for m, was in modes:
            m.training = was


def is_generation_ready(model) -> bool:
    """True when none of the training switches above is on (what the tests check inside the context)."""
    _, config = attention._text_config(model)
    return (not any(m.training for m in model.modules())
            and not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
            and not any(getattr(m, "cast_input_dtype_enabled", True) is False for m in model.modules())
            and not any(getattr(layer, "_compiled_call_impl", None) is not None
                        for layer in (decoder_layers(model) or []))
            and config._attn_implementation != attention.VARLEN and bool(config.use_cache))


__all__ = ["generation_mode", "is_generation_ready"]
