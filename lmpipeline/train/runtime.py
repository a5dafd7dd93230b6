"""Process-level set-up for a training stage: the accelerate handle, trackers, seeds, threads.

Under `accelerate launch` / `torchrun` every process runs the whole pipeline; the process group is
created once (distributed_state) with a collective timeout, shared by every stage, and destroyed
once at the end of the run (shutdown_distributed), never between stages.

Collective timeout: LMPIPELINE_COLLECTIVE_TIMEOUT_S (seconds, default 1800). A rank that waits
longer than this in an all-reduce/barrier fails instead of hanging the job forever; it must cover
the slowest thing one rank does while the others wait (a checkpoint write, the main process's eval
or merge stage). Raises UserError for a value that is not a positive number.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.errors import UserError

COLLECTIVE_TIMEOUT_ENV = "LMPIPELINE_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def collective_timeout_s() -> float:
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
                        hint=f"unset it (default {DEFAULT_COLLECTIVE_TIMEOUT_S:.0f}) or set e.g. {COLLECTIVE_TIMEOUT_ENV}=3600")
    return value


def distributed_state():
    """accelerate's process-wide state; creating it first joins the process group (with our timeout).

    Single process: no process group, everything here is a no-op. accelerate ignores the timeout
    once the state exists, so every entry point (pipeline, make_accelerator) goes through here.
    """
    import torch
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate joins a CPU process group (gloo) only when told to run on the CPU; under a bare
    # torchrun on a machine without CUDA it would otherwise run N independent copies of the job.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        world > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=_dt.timedelta(seconds=collective_timeout_s()))
    if world > 1 and state.num_processes != world:
        raise UserError(f"launched as {world} processes (WORLD_SIZE) but accelerate set up {state.num_processes}",
                        hint="launch with `lmpipeline launch`, `accelerate launch` or `torchrun`, and do not mix "
                             "their environment variables")
    return state


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from accelerate.state import AcceleratorState

        dist.destroy_process_group()
        # accelerate's state still describes the destroyed group; a later run in this process starts afresh.
        AcceleratorState._reset_state(reset_partial_state=True)


SHARDED_TYPES = ("FSDP", "DEEPSPEED")


def is_sharded(accelerator) -> bool:
    """True when no single rank holds every weight (FSDP/FSDP2, DeepSpeed ZeRO)."""
    return getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type)) in SHARDED_TYPES


def full_state_dict(accelerator, model) -> dict | None:
    """The trained weights, gathered, on the main process; None when every rank already has them.

    A collective under FSDP2/DeepSpeed: every rank must call it. `model` may be the module the stage
    built; the prepared wrapper (the DeepSpeed engine) is looked up, since only it can gather.
    """
    from lmpipeline.train import sharded

    if not is_sharded(accelerator):
        return None
    inner = accelerator.unwrap_model(model)
    if sharded.is_fsdp(accelerator):
        return sharded.full_weights(inner)  # trainable tensors only: an adapter, not the frozen base
    prepared = next((m for m in accelerator._models if accelerator.unwrap_model(m) is inner), model)
    return accelerator.get_state_dict(prepared)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_accelerator(cfg: TrainStageConfig, output_dir: Path):
    """An Accelerator for device placement, DDP and trackers.

    Mixed precision is applied by the loop's own autocast rather than accelerate's, because
    accelerate's state is process-global and a pipeline runs stages with different precisions.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    class _StageAccelerator(Accelerator):
        def end_training(self):
            # accelerate's end_training also destroys the process group, which would break the next
            # stage's collectives (and the barrier after the final save): only the trackers end here.
            for tracker in self.trackers:
                tracker.finish()

    distributed_state()
    # accelerate warns on every rank that broadcast_buffers is deprecated, yet its own advice is to keep
    # broadcast_buffers=False until its replacement can skip the sync at start too: nothing to act on.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    trackers = cfg.trackers
    if "wandb" in trackers:
        # Offline unless the user explicitly chose otherwise: nothing leaves the machine by default.
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (output_dir / "mlruns").resolve().as_uri())
    try:
        accelerator = _StageAccelerator(
            log_with=trackers or None, project_dir=str(output_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(seconds=collective_timeout_s())),
                             # A causal LM's buffers (rotary tables) never change in training: DDP's
                             # broadcast of them before every forward is a collective for nothing.
                             DistributedDataParallelKwargs(broadcast_buffers=False)])
    except (ImportError, ValueError) as e:
        raise UserError(f"tracker set-up failed: {e}", key="report_to",
                        hint="install the tracker's package (tensorboard, wandb, mlflow) or use report_to: none") from None
    if accelerator.distributed_type == "FSDP" and not accelerator.is_fsdp2:
        raise UserError("FSDP version 1 is not supported (its checkpoints and saved adapters would be shards)",
                        key="fsdp_version", hint="use `lmpipeline launch --strategy fsdp2`, or fsdp_version: 2 in your accelerate config")
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # The loop owns batching and accumulation (it marks the accumulation boundary itself):
        # DeepSpeed gets the real numbers instead of "auto", which needs a dataloader to resolve.
        bs, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        ds.deepspeed_config.update({"train_micro_batch_size_per_gpu": bs, "gradient_accumulation_steps": ga,
                                    "train_batch_size": bs * ga * accelerator.num_processes,
                                    "gradient_clipping": cfg.max_grad_norm})
    if trackers:
        run_config = {k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.run_name or cfg.stage_name or "lmpipeline", config=run_config)
    return accelerator
