"""The reference model of the methods that compare with one (DPO and its family, KTO): what every
such method shares, however its data is laid out.

    reference_mode    how a run obtains reference log-probs, or a UserError for a config that cannot work
    planned_reference the reference a config runs with, before any model exists (for the estimator)
    disable_dropout   policy and reference must be the same network (TRL's disable_dropout=True)
    gather_ordered    per-rank shares of a reference pass, merged in item order
    broadcast         the main process's cache lookup, to every process
"""

from __future__ import annotations

import torch

from lmpipeline.errors import UserError


def reference_mode(cfg, *, stacked: bool, key: str, reference_free: bool = False, loss: str = "this loss",
                   none_hint: str = "use reference: auto") -> str:
    """How the objective obtains reference log-probs for `cfg` ("none", "frozen_copy", "adapter_disabled" or
    "adapter"), or a UserError for a combination that cannot work. `stacked`: the previous adapter is kept
    frozen under the new one; `reference_free`: the loss compares with no reference; `loss` names the loss
    in messages."""
    if reference_free:
        if cfg.reference not in ("auto", "none"):
            raise UserError(f"{loss} is reference-free; reference: {cfg.reference} has no "
                            "effect", key=key, hint="set reference: auto (or none)")
        return "none"
    if cfg.reference == "none":
        raise UserError(f"{loss} needs a reference model", key=key, hint=none_hint)
    if cfg.reference == "frozen_copy":
        return "frozen_copy"
    if cfg.reference == "adapter_disabled":
        if not cfg.use_lora:
            raise UserError("reference: adapter_disabled needs LoRA (use_lora: true)", key=key,
                            hint="full fine-tuning uses reference: auto or frozen_copy")
        return "adapter_disabled"
    if cfg.use_lora:
        return "adapter" if stacked else "adapter_disabled"
    return "frozen_copy"


def planned_reference(cfg, *, reference_free: bool = False) -> str:
    """The reference a config runs with, before any model exists (the estimator plans its memory and passes):
    none for a reference-free loss (or reference: none), precomputed when cached log-probs replace it,
    a frozen copy for full fine-tuning or when asked, else the LoRA policy with its adapter disabled."""
    if reference_free or cfg.reference == "none":
        return "none"
    if cfg.precompute_ref_log_probs:
        return "precomputed"
    if cfg.reference == "frozen_copy" or not cfg.use_lora:
        return "frozen_copy"
    return "adapter_disabled"


def disable_dropout(model) -> int:
    """Set p=0 on every Dropout module (TRL's disable_dropout_in_model); returns how many had p > 0."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            n += 1
    return n


def gather_ordered(part: dict[int, tuple[float, float]], accelerator) -> dict[int, tuple[float, float]]:
    if accelerator.num_processes == 1:
        return part
    import torch.distributed as dist

    parts = [None] * accelerator.num_processes
    dist.all_gather_object(parts, part)
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


def broadcast(obj, accelerator):
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]

