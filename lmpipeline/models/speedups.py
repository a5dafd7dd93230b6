"""The switches that make a training stage fast, on for training and undone afterwards.

    with TrainingSpeedups(model, cfg, packed=True) as speed:
        ... train ...          # speed.varlen says whether batches should be laid out packed

- Varlen attention over packed rows (models/attention.py) instead of SDPA with a block mask.
- PEFT's cast of each LoRA layer's input to the adapter dtype (float32) switched off under bf16/fp16
  autocast: autocast casts it straight back to bf16 for the matmul, so the round trip is exact and
  only costs two activation-sized copies per adapted module (the largest "other" kernels in
  bench/profile_step.py's H100 profile: 11% of GPU time) and one saved copy per module for the
  backward (a norm's output, shared by q/k/v, was saved three times).
- torch.compile of the decoder layers (`torch_compile`, models/compile.py; `auto` is decided per run by
  resolve_torch_compile from the run's length and what was measured).

Each is undone on exit, because the same model may go on to generate (left padding, no autocast).
Measured effects: bench/README.md.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from lmpipeline.models import attention
from lmpipeline.models.compile import compile_by_default, compile_decoder_layers, uncompile_decoder_layers
from lmpipeline.train.optim import planned_steps

log = logging.getLogger(__name__)


def _cast_flags(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]


def resolve_torch_compile(cfg, rows_per_epoch: int):
    """`torch_compile: auto` becomes true or false once the data is known (models/compile.compile_by_default):
    `rows_per_epoch` are the micro-batch rows of one epoch (examples, pairs, or packed bins)."""
    if cfg.torch_compile != "auto":
        return cfg
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate/torchrun for every process
    micro_batches = math.ceil(rows_per_epoch / cfg.per_device_train_batch_size)
    _, steps = planned_steps(cfg, micro_batches, world)
    on, why = compile_by_default(cfg, optimizer_steps=steps, cuda=torch.cuda.is_available(), processes=world)
    log.info("[%s] torch_compile (auto): %s, %s", cfg.stage_name, "on" if on else "off", why)
    return cfg.model_copy(update={"torch_compile": on})


class TrainingSpeedups:
    """See the module docstring. `others`: further models that run the same batches (a frozen DPO
    reference) and need the same attention implementation. `eager_rounding`: compiled layers round as
    eager does (models/compile.EAGER_ROUNDING), for DPO, whose reference runs without gradients."""

    def __init__(self, model, cfg, *, packed: bool, others=(), eager_rounding: bool = False):
        self.model = model
        self.cfg = cfg
        self.eager_rounding = eager_rounding
        self.others = [m for m in others if m is not None]
        self.implementation = attention.attention_for(model, requested=cfg.attn_implementation, packed=packed,
                                                      max_seq_length=cfg.max_seq_length)
        self._attention_before: list[tuple[object, str]] = []
        self._uncast: list[torch.nn.Module] = []
        self._compiled = False

    @property
    def varlen(self) -> bool:
        """True when batches should be packed rows with cu_seq_lens (the varlen kernel reads them)."""
        return self.implementation is not None

    def __enter__(self) -> "TrainingSpeedups":
        cfg, name = self.cfg, self.cfg.stage_name
        on = []
        if self.implementation:
            for m in [self.model, *self.others]:
                self._attention_before.append((m, attention.switch(m, self.implementation)))
            on.append(f"attention {self.implementation} over packed rows")
        if cfg.bf16 is True or cfg.fp16:  # exact only under autocast, which bf16/fp16 training runs in
            self._uncast = [m for m in _cast_flags(self.model) if m.cast_input_dtype_enabled]
            for m in self._uncast:
                m.cast_input_dtype_enabled = False
            if self._uncast:
                on.append(f"LoRA input casts off in {len(self._uncast)} layers (autocast)")
        if cfg.torch_compile is True:  # "auto" is resolved by the stage once the data is known
            self._compiled = compile_decoder_layers(self.model, eager_rounding=self.eager_rounding) > 0
            if self._compiled:
                on.append("decoder layers compiled")
        if on:
            log.info("[%s] speed-ups: %s", name, "; ".join(on))
        return self

    def __exit__(self, *exc) -> None:
        for m, before in self._attention_before:
            attention.switch(m, before)
        for m in self._uncast:
            m.cast_input_dtype_enabled = True
        if self._compiled:
            uncompile_decoder_layers(self.model)
        self._attention_before, self._uncast, self._compiled = [], [], False
