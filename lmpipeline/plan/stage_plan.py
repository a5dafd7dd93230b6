"""One plan per training stage: memory, time, fit on every GPU of the table, and what auto resolves to.

`lmpipeline estimate` prints these (commands/estimate_cmd.py, `plan_config`); a stage about to run is
planned by `prepare_stage`: auto values resolved (plan/autofit.py) and the fit checked before any
weight loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from lmpipeline.config.presets import Architecture, resolve_architecture
from lmpipeline.models.compile import COMPILE_MIN_STEPS, compile_by_default
from lmpipeline.plan import autofit, hardware
from lmpipeline.plan.estimate import (
    MemoryEstimate,
    Setup,
    TokenProfile,
    _without_flash_kernel,
    estimate_memory,
    rows_seen,
    setup_from_stage,
)
from lmpipeline.errors import UserError
from lmpipeline.plan.profile import profile_data
from lmpipeline.plan.suggest import suggestions
from lmpipeline.plan.timing import TimeEstimate, estimate_time

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    name: str
    method: Any  # the stage's Method (lmpipeline/methods)
    arch: Architecture | None = None
    setup: Setup | None = None
    profile: TokenProfile = field(default_factory=TokenProfile)
    memory: MemoryEstimate | None = None
    time: TimeEstimate | None = None
    device: hardware.GPU | None = None  # the GPU asked about (--gpu, or the one present)
    fits: bool | None = None
    smallest: hardware.GPU | None = None
    table: list[tuple[hardware.GPU, bool]] = field(default_factory=list)
    suggestions: list[tuple[str, float, bool]] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)  # auto values and what they resolved to
    notes: list[str] = field(default_factory=list)
    reason: str | None = None  # why there is no estimate

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"stage": self.name, "kind": self.method.name, "fits_on": [g.name for g, ok in self.table if ok]}
        if self.reason:
            out["reason"] = self.reason
        if self.arch is not None:
            out["model"] = {"name": self.arch.name, "source": self.arch.source, "parameters": self.arch.total_params}
        if self.memory is not None:
            out["memory"] = self.memory.as_dict()
        if self.time is not None:
            out["time"] = self.time.as_dict()
        if self.device is not None:
            out["gpu"] = {"name": self.device.name, "memory_gib": round(self.device.memory_gib, 1), "fits": self.fits}
        out["smallest_gpu"] = self.smallest.name if self.smallest else None
        if self.resolved:
            out["resolved"] = self.resolved
        return out


def _compile_decision(stage, total_steps: int | None, world: int) -> str:
    """`torch_compile: auto` as the stage will resolve it on a CUDA GPU (models/compile.compile_by_default)."""
    if total_steps is None:
        return f"decided from the run's length once the data is read (compiles from {COMPILE_MIN_STEPS} optimizer steps)"
    on, why = compile_by_default(stage, optimizer_steps=total_steps, cuda=True, processes=world)
    return f"{str(on).lower()} ({why})"


def plan_stage(stage, method, arch: Architecture | None, *, device: hardware.GPU | None = None,
               torch_dtype: str = "auto", impl: str = "lmpipeline", profile: TokenProfile | None = None,
               world: int = 1) -> StagePlan:
    """Memory, time and fit of one training stage config of `method` (auto values resolved for `device`)."""
    plan = StagePlan(stage.stage_name or method.name, method, arch, profile=profile or TokenProfile(), device=device)
    if arch is None:
        plan.reason = "model architecture unknown (not a local folder, not a shipped config, not in the HF cache)"
        return plan
    resolved, derived, messages = autofit.resolve_auto(stage, method, arch, device, profile=plan.profile,
                                                       torch_dtype=torch_dtype, impl=impl, planning=True)
    plan.resolved = derived
    plan.notes.extend(m for m in messages if " -> " not in m)  # the resolved values are shown on their own
    # T4, V100: no varlen kernel, so their rows are laid out as they run there (setups by flash_attention)
    with_flash = setup_from_stage(resolved, method, torch_dtype=torch_dtype, impl=impl, arch=arch)
    setups = {True: with_flash, False: _without_flash_kernel(with_flash, resolved)}
    plan.setup = setups[device is None or device.flash_attention]
    seen = rows_seen(resolved, plan.profile)
    plan.memory = estimate_memory(arch, plan.setup, plan.profile, seen)
    peaks = {flash: plan.memory.peak if setup is plan.setup else estimate_memory(arch, setup, plan.profile, seen).peak
             for flash, setup in setups.items()}
    plan.table = [(g, hardware.fits(peaks[g.flash_attention], g)) for g in hardware.GPUS]
    plan.smallest = hardware.smallest_fitting(lambda g: peaks[g.flash_attention])
    speed_gpu = device or hardware.gpu("h100-80gb")
    plan.time = estimate_time(arch, plan.setup, speed_gpu, plan.profile, epochs=resolved.num_train_epochs,
                              max_steps=resolved.max_steps, world=world)
    if getattr(stage, "torch_compile", None) == "auto":  # what the stage will resolve on this GPU (planned eager)
        plan.resolved["torch_compile"] = _compile_decision(resolved, plan.time.total_steps, world)
    if device is not None:
        plan.fits = hardware.fits(plan.memory.peak, device)
        if not plan.fits:
            plan.suggestions = suggestions(arch, plan.setup, device, plan.profile, seen)
        if resolved.bf16 is True and not device.bf16:
            plan.notes.append(f"{device.label} has no bfloat16 tensor cores: use fp16: true instead of bf16")
    return plan


def plan_config(cfg, method_of: Callable[[str], Any], *, device: hardware.GPU | None = None,
                impl: str = "lmpipeline", read_data: bool = True) -> list[StagePlan]:
    """One StagePlan per training stage of a loaded PipelineConfig; `method_of(stage name)` is the method
    table's lookup (lmpipeline.methods.method_for), None for stages that do not train."""
    arch = resolve_architecture(cfg.model_name_or_path, preset=getattr(cfg, "preset", None))
    tok = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    plans = []
    for name in cfg.stages:
        method = method_of(name)
        if method is None:
            continue
        stage = cfg.stage(name)
        profile = profile_data(stage, method.data, tok) if read_data else TokenProfile()
        plans.append(plan_stage(stage, method, arch, device=device, torch_dtype=cfg.torch_dtype, impl=impl,
                                profile=profile))
    return plans


def prepare_stage(stage, method, *, model: str | None, preset: str | None = None, torch_dtype: str = "auto",
                  device: hardware.GPU | None = None, detect: bool = True, check: bool = True):
    """Resolve auto values and check the fit of a training stage before its weights load.

    Returns (stage config with concrete values, {field: resolved value}, estimate summary or None).
    Raises UserError when a GPU is present (or given) and the stage cannot fit it."""
    device = device or (hardware.detect_gpu() if detect else None)
    if device is None and not autofit.has_auto(stage):
        return stage, {}, None
    try:
        arch = resolve_architecture(model, preset=preset)
    except Exception as e:  # noqa: BLE001 - an unreadable config.json is reported by the loader itself
        log.warning("[%s] architecture of `%s` not readable (%s): no memory estimate", stage.stage_name, model, e)
        arch = None
    if arch is None:
        resolved, derived, messages = autofit.resolve_auto(stage, method, None, device, torch_dtype=torch_dtype)
        for m in messages:
            log.info(m)
        if device is not None:
            log.info("[%s] no architecture known for `%s`: the memory check is skipped", stage.stage_name, model)
        return resolved, derived, None
    profile = profile_data(stage, method.data, model) if device is not None else TokenProfile()
    resolved, derived, messages = autofit.resolve_auto(stage, method, arch, device, profile=profile, torch_dtype=torch_dtype)
    for m in messages:
        log.info(m)
    if device is None:
        return resolved, derived, None
    plan = plan_stage(resolved, method, arch, device=device, torch_dtype=torch_dtype, profile=profile)
    summary = plan.as_dict()
    log.info("[%s] memory estimate: %.1f GiB peak (%s), %.1f GiB with headroom, on %s (%.0f GiB)", stage.stage_name,
             plan.memory.peak / hardware.GIB, plan.memory.phase, plan.memory.required / hardware.GIB, device.label,
             device.memory_gib)
    if check and not plan.fits:
        if os.environ.get(autofit.SKIP_ENV) == "1":
            log.warning("[%s] %s\n  (%s=1: starting anyway)", stage.stage_name, autofit.format_not_fitting(plan), autofit.SKIP_ENV)
        else:
            raise UserError(autofit.format_not_fitting(plan), key=f"stage_configs.{stage.stage_name}",
                            hint=f"apply one of the changes above; `lmpipeline estimate CONFIG --gpu NAME` shows "
                                 f"the estimate; {autofit.SKIP_ENV}=1 starts anyway if you know better")
    return resolved, derived, summary
