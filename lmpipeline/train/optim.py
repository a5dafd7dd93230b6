"""Optimizers and learning-rate schedules by name (the names TrainingArguments users know)."""

from __future__ import annotations

import math

import torch

from lmpipeline.config.schema import GPU_ONLY_OPTIMIZERS, TrainStageConfig
from lmpipeline.errors import UserError


def build_optimizer(params, stage: TrainStageConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters", key="use_lora")
    name = stage.optim
    adam = dict(lr=stage.learning_rate, betas=(stage.adam_beta1, stage.adam_beta2), eps=stage.adam_epsilon,
                weight_decay=stage.weight_decay)
    if name in GPU_ONLY_OPTIMIZERS:
        if not torch.cuda.is_available():
            raise UserError(f"optimizer `{name}` (bitsandbytes) needs a CUDA GPU", key=f"stage_configs.{stage.stage_name}.optim",
                            hint="use adamw_torch on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"optimizer `{name}` needs bitsandbytes", key="optim", hint="pip install 'lmpipeline[gpu]'") from None
        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
        return cls(params, **adam)
    if name in ("adamw_torch", "adamw"):
        return torch.optim.AdamW(params, **adam)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, fused=torch.cuda.is_available(), **adam)
    if name == "sgd":
        return torch.optim.SGD(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=stage.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=stage.weight_decay)
    raise UserError(f"unknown optimizer `{name}`", key="optim")


def build_scheduler(optimizer, stage: TrainStageConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = stage.warmup_steps or int(round(stage.warmup_ratio * total_steps))
    return get_scheduler(stage.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def planned_steps(cfg, micro_batches_per_epoch: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in all): max_steps when set, else the epochs' worth."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / (cfg.gradient_accumulation_steps * world)))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    return steps_per_epoch, total
