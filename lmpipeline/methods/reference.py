"""The reference model of the methods that compare with one (DPO and its family, KTO): what every
such method shares, however its data is laid out.

    disable_dropout   policy and reference must be the same network (TRL's disable_dropout=True)
    gather_ordered    per-rank shares of a reference pass, merged in item order
    broadcast         the main process's cache lookup, to every process
"""

from __future__ import annotations

import torch


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


# ----------------------------------------------------------------------------------------------
# The stage
