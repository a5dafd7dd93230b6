"""What a run needs from this machine, checked before any data is tokenised or weight is loaded.

`missing_requirements(cfg)` lists, for every training stage, what the config asks of the machine and the
machine lacks, each with its config key (file:line where known) and the fix:
  - use_4bit / use_8bit (QLoRA, 8-bit base): a CUDA GPU and bitsandbytes;
  - the 8-bit and paged optimizers (adamw_8bit, paged_adamw_*): a CUDA GPU and bitsandbytes;
  - use_liger_kernel: a CUDA GPU (Triton kernels) and liger-kernel;
  - report_to: the tracker's package (wandb, tensorboard, mlflow); without it accelerate only warns and
    the run would log nothing.
`check_requirements(cfg)` raises one UserError listing them all. `lmpipeline validate` and `lmpipeline run`
both call it, so a run fails the way validate does, before it tokenises anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from lmpipeline.config.loader import key_location
from lmpipeline.config.schema import GPU_ONLY_OPTIMIZERS, STAGE_ALIASES, TRAINING_KINDS, PipelineConfig
from lmpipeline.errors import UserError

GPU_EXTRA = "pip install 'lmpipeline[gpu]' (bitsandbytes and liger-kernel)"
# report_to name -> (modules any one of which the tracker imports, what to install)
TRACKER_PACKAGES = {
    "wandb": (("wandb",), "pip install wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard (or pip install 'lmpipeline[tracking]')"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}


@dataclass(frozen=True)
class Missing:
    """One thing the run needs that this machine lacks."""

    key: str  # dotted config key
    where: str  # file:line of the key, or the file
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.problem}\n    -> {self.fix}"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def missing_requirements(cfg: PipelineConfig, *, cuda: bool | None = None,
                         has_module: Callable[[str], bool] = installed) -> list[Missing]:
    """Everything the config's training stages need that this machine lacks (empty: the run can start)."""
    found: list[Missing] = []
    gpu = cuda_available() if cuda is None else cuda

    def need(name: str, key: str, problem: str, fix: str) -> None:
        dotted = f"stage_configs.{name}.{key}"
        found.append(Missing(dotted, key_location(cfg, dotted), problem, fix))

    for name in cfg.stages:
        if STAGE_ALIASES.get(name) not in TRAINING_KINDS:
            continue
        stage = cfg.stage(name)
        if stage.use_4bit or stage.use_8bit:
            key = "use_4bit" if stage.use_4bit else "use_8bit"
            bits = "4-bit" if stage.use_4bit else "8-bit"
            if not gpu:
                need(name, key, f"{bits} loading (bitsandbytes) needs a CUDA GPU and none is visible",
                     f"run on a machine with a CUDA GPU, or set {key}: false to train LoRA on bf16/fp32 weights here")
            if not has_module("bitsandbytes"):
                need(name, key, f"{bits} loading needs bitsandbytes, which is not installed", GPU_EXTRA)
        if stage.optim in GPU_ONLY_OPTIMIZERS:
            if not gpu:
                need(name, "optim", f"optimizer {stage.optim} (bitsandbytes) needs a CUDA GPU and none is visible",
                     "run on a machine with a CUDA GPU, or set optim: adamw_torch")
            if not has_module("bitsandbytes"):
                need(name, "optim", f"optimizer {stage.optim} needs bitsandbytes, which is not installed", GPU_EXTRA)
        if stage.use_liger_kernel:
            if not gpu:
                need(name, "use_liger_kernel", "Liger's Triton kernels need a CUDA GPU and none is visible",
                     "run on a machine with a CUDA GPU, or set use_liger_kernel: false")
            if not has_module("liger_kernel"):
                need(name, "use_liger_kernel", "use_liger_kernel needs liger-kernel, which is not installed", GPU_EXTRA)
        for tracker in stage.trackers:
            modules, fix = TRACKER_PACKAGES.get(tracker, ((tracker,), f"pip install {tracker}"))
            if not any(has_module(m) for m in modules):
                need(name, "report_to", f"report_to {tracker}: the {modules[0]} package is not installed, so "
                                        "nothing would be logged", f"{fix}, or set report_to: none")
    return found


def check_requirements(cfg: PipelineConfig) -> None:
    """Raise a UserError listing everything the run needs that this machine lacks."""
    found = missing_requirements(cfg)
    if found:
        raise UserError("this machine lacks what the config needs:\n  " + "\n  ".join(str(m) for m in found))
