"""Regional torch.compile: each decoder layer compiled, the rest of the model left eager.

All layers of a model share one compiled graph (torch >= 2.5 treats a module's parameters as inputs,
so the 28 layers of Llama-3.2-3B compile once), which keeps compile time to one layer's. Shapes are
dynamic (dynamic=True): a packed row's length and its number of examples change every step, and a
static-shape compile would recompile for each. Attention stays whatever the model uses (the varlen op
of models/attention.py is a registered custom op, so it compiles as one opaque call).
Fuses what PyTorch runs as many small kernels per layer: RMSNorm's float32 round trip, RoPE, SiLU x up,
LoRA's casts, scale and add.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers (under PEFT and accelerate wrappers), or None."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    base = getattr(inner, "model", inner)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


# transformers (5.x) records hidden states and attentions through forward hooks of this name on every
# decoder layer and attention module. They read a ContextVar, which Dynamo cannot trace: each layer
# compiled with them runs as 3 graphs (2 graph breaks), paying 3 guard checks and 3 runtime wrappers per
# pass (bench/README.md, the step profile). While the layers are compiled the hooks are set aside;
# training reads the final hidden state from the decoder's own output (methods/logprobs.py) instead.
CAPTURE_HOOK_NAME = "output_capturing_hook"
_SET_ASIDE = "_lmpipeline_capture_hooks"


def _install_capture_hooks(model) -> None:
    """transformers installs its hooks at the first forward; do it now, so they can be set aside."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # a transformers without them: nothing to set aside
        return
    from transformers import PreTrainedModel

    # Only on the innermost models (the decoder, not the causal-LM wrapper around it): installing from a
    # wrapper reinstalls the decoder's hooks even when it has them, and every output would be recorded twice.
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for module in models:
        if not any(other is not module and isinstance(other, PreTrainedModel) for other in module.modules()):
            maybe_install_capturing_hooks(module)


def _set_aside_capture_hooks(layer: torch.nn.Module) -> int:
    kept = []
    for module in layer.modules():
        for hook_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == CAPTURE_HOOK_NAME:
                kept.append((module, hook_id, hook))
                del module._forward_hooks[hook_id]
    setattr(layer, _SET_ASIDE, getattr(layer, _SET_ASIDE, []) + kept)
    return len(kept)


def _restore_capture_hooks(layer: torch.nn.Module) -> None:
    for module, hook_id, hook in getattr(layer, _SET_ASIDE, []):
        module._forward_hooks[hook_id] = hook
    if hasattr(layer, _SET_ASIDE):
        delattr(layer, _SET_ASIDE)


# Inductor keeps a fused chain of bf16 operations in float32 where eager rounds after each one. Where it
# may round depends on the graph: the training graph must store some intermediates for the backward (in
# bf16), the no-gradient graph need not. A DPO reference computed without gradients then differs from the
# policy's training forward on the same weights: on random Llama-3.2-3B QLoRA the first step's loss was
# 0.6728 instead of ln 2 = 0.6931 (0.2-0.6 nats of summed log-probs per sequence; bench/README.md).
# With Inductor's emulate_precision_casts both graphs round where eager does: 0.6943, at the
# same speed within the noise of that call.
EAGER_ROUNDING = {"emulate_precision_casts": True}


# torch_compile: auto. What compiling gains per step, measured (bench/README.md): bf16 LoRA packed 14,392 ->
# 16,450-19,725 tokens/s and 3.3 GiB less; all layers checkpointed 8,834 -> 10,289-11,688; QLoRA NF4 at the
# 2 x GA 4 config 2,308 -> 3,403, DPO QLoRA likewise. What it costs: once, the first step (92 s
# instead of 1.5 s for Llama-3.2-3B DPO QLoRA on the H200). ~90 s are repaid after 90 steps (1.5x,
# 3 s steps) to 540 steps (1.2x, 1 s steps); 300 sits between: pilot and smoke runs (tens of steps) stay
# eager, real runs (thousands of steps: one alpaca epoch at 16 rows per step is 3,250) compile.
COMPILE_MIN_STEPS = 300


def compile_by_default(cfg, *, optimizer_steps: int, cuda: bool, processes: int) -> tuple[bool, str]:
    """What `torch_compile: auto` resolves to, and why (for the log). On only where it was measured to win:
    LoRA or 4-bit QLoRA in bf16 on a CUDA GPU, one process, a run of at least COMPILE_MIN_STEPS optimizer
    steps. 8-bit bases, DoRA, fp16/fp32, full fine-tuning and several processes (DDP/FSDP) have not been
    measured compiled, so auto leaves them eager; `torch_compile: true` still compiles them."""
    if not cuda:
        return False, "no CUDA GPU"
    if not cfg.use_lora or cfg.use_8bit or cfg.use_dora:
        return False, "only LoRA and 4-bit QLoRA were measured compiled"
    if cfg.bf16 is not True:
        return False, "only bf16 was measured compiled"
    if processes > 1:
        return False, f"{processes} processes (compiled layers were measured on one GPU)"
    if optimizer_steps < COMPILE_MIN_STEPS:
        return False, (f"{optimizer_steps:,} optimizer steps: compiling costs about a minute once and pays "
                       f"from about {COMPILE_MIN_STEPS}")
    return True, f"{optimizer_steps:,} optimizer steps repay its one-off compile (about a minute)"


def compile_decoder_layers(model, *, eager_rounding: bool = False) -> int:
    """Compile every decoder layer in place (Module.compile); returns how many were compiled.
    `eager_rounding`: round bf16/fp16 intermediates where eager does (EAGER_ROUNDING), so forwards with and
    without gradients agree (DPO's reference and policy)."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning("torch_compile: no decoder layer list found on %s; running eager", type(model).__name__)
        return 0
    _install_capture_hooks(model)
    set_aside = 0
    for layer in layers:
        set_aside += _set_aside_capture_hooks(layer)
        layer.compile(dynamic=True, options=dict(EAGER_ROUNDING) if eager_rounding else None)
    log.info("torch_compile: %d decoder layers compiled (one graph, dynamic shapes%s%s)", len(layers),
             f"; {set_aside} output-capturing hooks set aside" if set_aside else "",
             "; rounding as eager" if eager_rounding else "")
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Back to eager layers (after training: generation would recompile for its own shapes), with
    transformers' output-capturing hooks back in place."""
    layers = decoder_layers(model)
    for layer in layers or []:
        layer._compiled_call_impl = None
        _restore_capture_hooks(layer)


def shaped_for_layers(batch: dict, cfg) -> dict:
    """A packed batch as the run's decoder layers take it: static_max_length to max_seq_length when they are
    compiled (`torch_compile` true; auto is resolved by the stage before batches are made), else as is."""
    return static_max_length(batch, cfg.max_seq_length) if cfg.torch_compile is True else batch


def static_max_length(batch: dict, bound: int) -> dict:
    """A packed batch whose `max_length` is the fixed `bound` instead of its longest example. The varlen
    kernel only uses it to size its grid (blocks past an example's end exit at once), and a value that
    changes every step would make torch.compile recompile the layer every step."""
    for key in ("max_length", "max_length_k"):
        if key in batch:
            batch[key] = max(int(batch[key]), bound)
    return batch
