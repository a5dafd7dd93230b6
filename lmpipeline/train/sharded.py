"""Checkpoints of FSDP2-sharded training, in the same format as unsharded ones.

Under FSDP2 no rank holds a whole weight or a whole optimizer state: each holds a shard (a DTensor).
A checkpoint is written as full tensors, so it can be read by any number of processes, by a single
process, or by PEFT/transformers directly:
  - `full_weights(model)`: the trainable parameters gathered one at a time (a LoRA run gathers its
    adapter, never the frozen base, so a 70B QLoRA never needs the whole model in rank 0's memory);
  - `gathered(model, optimizer)`: a collective every rank joins; returns stand-ins that
    lmpipeline.train.checkpoint.save_checkpoint (run on rank 0 only) saves like the real objects:
    the adapter (or full weights) through save_pretrained(state_dict=full), and the optimizer's
    full state dict (torch.distributed.checkpoint's FQN-keyed form);
  - `load_checkpoint(ckpt, model, optimizer, scheduler)`: rank 0 reads the files, and
    set_model_state_dict/set_optimizer_state_dict (broadcast_from_rank0) scatter every shard.

Assumes torch.distributed.checkpoint.state_dict (torch >= 2.4) and a model sharded with
fully_shard (accelerate's fsdp_version: 2). Raises RuntimeError for a checkpoint whose tensors do
not match the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def is_fsdp(accelerator) -> bool:
    """FSDP2 (fully_shard); FSDP1 is refused when the accelerator is made (lmpipeline.train.runtime)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


class _FullModel:
    """save_pretrained of the real model, fed the gathered full weights."""

    def __init__(self, model, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kwargs):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)


class _FullOptimizer:
    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def full_weights(model) -> dict:
    """Full trainable tensors on rank 0 (CPU), {} elsewhere; every rank must call it (one all-gather per tensor)."""
    from torch.distributed.tensor import DTensor

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            if rank0:
                out[name] = full.cpu()
    return out


def gathered(model, optimizer):
    """(model, optimizer) stand-ins holding full tensors on rank 0; every rank must call this."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_options(cpu_offload=True))
    return _FullModel(model, full_weights(model)), _FullOptimizer(optim)


def _adapter_to_model_keys(model, loaded: dict) -> dict:
    """PEFT files drop the adapter name (lora_A.default.weight -> lora_A.weight): map back to the model's names."""
    adapter = getattr(model, "active_adapter", None)
    if not isinstance(adapter, str):
        return loaded
    by_file_key = {n.replace(f".{adapter}.", "."): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in loaded if k not in by_file_key]
    if missing:
        raise RuntimeError(f"checkpoint adapter weights do not match the model: {missing[:3]}")
    return {by_file_key[k]: v for k, v in loaded.items()}


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler) -> dict:
    """Every rank calls this; rank 0 reads the files and the tensors are broadcast and re-sharded."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from lmpipeline.train import checkpoint as ckpt_io

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    weights, optim = {}, {}
    if rank0:
        adapter = ckpt / "adapter_model.safetensors"
        if adapter.exists():
            weights = _adapter_to_model_keys(model, load_file(adapter))
        else:
            for f in sorted(ckpt.glob("model*.safetensors")):
                weights.update(load_file(f))
        optim = ckpt_io.read_data_file(ckpt / "optimizer.pt")
    # Every rank reads these; each refuses a file that is more than data (train/checkpoint.read_data_file).
    sched = ckpt_io.read_data_file(ckpt / "scheduler.pt")
    rng = ckpt_io.read_data_file(ckpt / "rng_state.pt")
    set_model_state_dict(model, weights, options=_options(broadcast_from_rank0=True, strict=False))
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim, options=_options(broadcast_from_rank0=True))
    scheduler.load_state_dict(sched)
    ckpt_io.set_rng_state(rng)
    return ckpt_io.read_trainer_state(ckpt)
