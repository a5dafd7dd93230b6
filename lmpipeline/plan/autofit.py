"""Auto-fit: resolve `per_device_train_batch_size: auto` and `gradient_checkpointing: auto` from the
memory estimate for the GPU at hand, check that a stage fits before any weight is loaded, and (on a
GPU) confirm the choice with one real forward/backward step.

What auto means
- The global batch per device (micro-batch x gradient accumulation) is kept: it is `global_batch_size`
  when set, else the default micro-batch (4) x `gradient_accumulation_steps`. Auto picks the largest
  micro-batch that divides it and fits, and sets gradient accumulation to the rest. The training math
  is unchanged (the loop normalises the loss over the whole global batch, so micro-batch x GA equals
  one big batch); only memory and speed change.
- `gradient_checkpointing: auto` weighs no checkpointing, a quarter, half and all of the layers
  checkpointed (`gradient_checkpointing_fraction`): each with the largest micro-batch it fits, the one
  the time estimate makes fastest wins (recomputing a layer costs a third more of its FLOPs for LoRA;
  micro-batches under ~4,096 tokens run at lower MFU), ties going to less recomputation.
- "Fits" means the estimated peak plus hardware.headroom_bytes (CUDA context, allocator) is within
  the device's memory (torch.cuda.get_device_properties(...).total_memory).
- Without a CUDA GPU, auto resolves to the defaults (micro-batch 4, no checkpointing) with a message.

Every resolved value is printed and recorded in run.json under "derived" (pipeline.py), and
downstream code only ever sees concrete values: `resolve_auto` returns a new stage config.

`prepare_stage` raises a UserError before weights load when the stage cannot fit the GPU, with the
estimate and the changes that would make it fit (LMPIPELINE_SKIP_FIT_CHECK=1 turns that into a warning,
for when you know better than the estimate). `probe_micro_batch` runs one step at the chosen
size on the GPU and backs off (halving the micro-batch, raising GA) on out-of-memory.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from lmpipeline.config.presets import Architecture
from lmpipeline.data.build import make_batch_plans
from lmpipeline.errors import UserError
from lmpipeline.models.loading import enable_gradient_checkpointing
from lmpipeline.plan import estimate as est
from lmpipeline.plan import hardware, timing
from lmpipeline.train.optim import planned_steps

log = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH = 4  # the schema's default per_device_train_batch_size
# gradient_checkpointing: auto weighs these shares of checkpointed layers (0: none), least recompute first.
CHECKPOINT_OPTIONS = (0.0, 0.25, 0.5, 1.0)
PROBE_STEPS = 200  # at most this many of the run's first optimizer steps are searched for the heaviest micro-batch
SKIP_ENV = "LMPIPELINE_SKIP_FIT_CHECK"  # =1: warn instead of stopping when the estimate says it will not fit


def has_auto(stage) -> bool:
    return (stage.per_device_train_batch_size == "auto" or stage.gradient_checkpointing == "auto"
            or stage.bf16 == "auto")


# Model families whose activations overflow fp16's range (their own docs recommend bf16 or fp32).
FP16_UNSAFE_FAMILIES = ("gemma", "gemma2", "gemma3", "t5")


def resolve_precision(stage, arch: Architecture | None, device: hardware.GPU | None, *,
                      planning: bool) -> tuple[bool, bool, str]:
    """(bf16, fp16, why) for `bf16: auto`: bf16 where the GPU has bf16 tensor cores; on a GPU without them
    fp16 with loss scaling, unless the model family overflows in fp16 (then fp32); fp32 on the CPU.
    `planning` with no device: a plan for a GPU not named yet, which is planned as a bf16 one."""
    if stage.bf16 != "auto":
        return stage.bf16, stage.fp16, "as configured"
    if stage.fp16:
        return False, True, "fp16 is set"
    if device is None:
        return (True, False, "planned for a GPU with bf16") if planning else (False, False, "no CUDA GPU: fp32")
    if device.bf16:
        return True, False, f"{device.label} has bf16 tensor cores"
    family = arch.model_type if arch is not None else None
    if family in FP16_UNSAFE_FAMILIES:
        return False, False, f"{device.label} has no bf16 and {family} overflows in fp16: fp32"
    return False, True, f"{device.label} has no bf16: fp16 with loss scaling"


def target_global_batch(stage) -> int:
    if getattr(stage, "global_batch_size", None):
        return int(stage.global_batch_size)
    return DEFAULT_MICRO_BATCH * stage.gradient_accumulation_steps


def _divisors_desc(n: int) -> list[int]:
    return sorted({d for d in range(1, n + 1) if n % d == 0}, reverse=True)


def resolve_auto(stage, method, arch: Architecture | None, device: hardware.GPU | None, *,
                 profile=None, torch_dtype: str = "auto", impl: str = "lmpipeline",
                 planning: bool = False) -> tuple[Any, dict, list[str]]:
    """(stage config with concrete values, {field: resolved value}, messages) for a stage of `method`
    (lmpipeline/methods: its estimator terms). A stage without auto values comes back unchanged.
    `planning`: an estimate, not a run; with no device it plans for a GPU (bf16: auto as bf16)."""
    if not has_auto(stage):
        return stage, {}, []
    precision: dict[str, Any] = {}
    if stage.bf16 == "auto":
        bf16, fp16, why = resolve_precision(stage, arch, device, planning=planning)
        precision = {"bf16": bf16, "fp16": fp16}
        stage = stage.model_copy(update=precision)
    batch_auto = stage.per_device_train_batch_size == "auto"
    gc_auto = stage.gradient_checkpointing == "auto"
    target = target_global_batch(stage) if batch_auto else None
    messages: list[str] = []
    where = f"[{stage.stage_name or method.name}]"

    if device is None or arch is None:
        b = stage.per_device_train_batch_size
        if batch_auto:
            b = max(d for d in _divisors_desc(target) if d <= DEFAULT_MICRO_BATCH)
        ga = target // b if batch_auto else stage.gradient_accumulation_steps
        gc = False if gc_auto else stage.gradient_checkpointing
        fraction = stage.gradient_checkpointing_fraction
        why = "no CUDA GPU (or --gpu) given" if device is None else "model architecture unknown"
        messages.append(f"{where} {why}: auto resolves to the defaults")
    else:
        budget = hardware.max_peak_for(device.memory_bytes)
        sizes = _divisors_desc(target) if batch_auto else [stage.per_device_train_batch_size]
        if gc_auto:
            options = CHECKPOINT_OPTIONS
        else:
            options = [stage.gradient_checkpointing_fraction if stage.gradient_checkpointing else 0.0]
        # fraction of layers checkpointed -> (micro-batch, estimated peak, estimated tokens/s) at its largest fit
        best: dict[float, tuple[int, float, float]] = {}
        for fraction in options:
            for b in sizes:
                ga = target // b if batch_auto else stage.gradient_accumulation_steps
                trial = stage.model_copy(update={
                    "per_device_train_batch_size": b, "gradient_accumulation_steps": ga,
                    "gradient_checkpointing": fraction > 0, "gradient_checkpointing_fraction": fraction or 1.0})
                setup = est.setup_from_stage(trial, method, torch_dtype=torch_dtype, impl=impl, arch=arch)
                mem = est.estimate_memory(arch, setup, profile, est.rows_seen(trial, profile) if profile else None)
                if mem.peak <= budget:
                    speed = timing.estimate_time(arch, setup, device, profile).tokens_per_second
                    best[fraction] = (b, mem.peak, speed)
                    break
        if best:
            # max() keeps the first of equals: options run from least to most recomputation.
            fraction = max(best, key=lambda f: best[f][2])
            b, peak, _ = best[fraction]
            gc = fraction > 0
        else:
            gc = True if gc_auto else stage.gradient_checkpointing
            fraction = 1.0 if gc_auto else stage.gradient_checkpointing_fraction
            b = 1 if batch_auto else stage.per_device_train_batch_size
            peak = None
            messages.append(f"{where} nothing fits {device.label} ({device.memory_gib:.0f} GiB), "
                            "even micro-batch 1 with checkpointing: see the estimate")
        ga = target // b if batch_auto else stage.gradient_accumulation_steps
        if peak is not None:
            messages.append(f"{where} auto for {device.label} ({device.memory_gib:.0f} GiB): estimated peak "
                            f"{peak / hardware.GIB:.1f} GiB of a {budget / hardware.GIB:.1f} GiB budget")
    derived: dict[str, Any] = dict(precision)
    update: dict[str, Any] = {}
    if precision:
        chosen = "bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "fp32"
        messages.append(f"{where} bf16: auto -> {chosen} ({why})")
    if batch_auto:
        update["per_device_train_batch_size"] = b
        update["gradient_accumulation_steps"] = ga
        derived["per_device_train_batch_size"] = b
        derived["gradient_accumulation_steps"] = ga
        messages.append(f"{where} per_device_train_batch_size: auto -> {b}, gradient_accumulation_steps -> {ga} "
                        f"(global batch {b * ga} per device kept)")
    if gc_auto:
        update["gradient_checkpointing"] = gc
        derived["gradient_checkpointing"] = gc
        if gc and fraction < 1.0:
            update["gradient_checkpointing_fraction"] = derived["gradient_checkpointing_fraction"] = fraction
        messages.append(f"{where} gradient_checkpointing: auto -> {str(gc).lower()}"
                        + (f", gradient_checkpointing_fraction -> {fraction:g}" if gc and fraction < 1.0 else ""))
    resolved = stage.model_copy(update=update)
    # Which values were auto, for the probe step on the GPU (probe_sft).
    resolved._auto = {**{k: True for k in derived if k not in ("gradient_accumulation_steps", "bf16", "fp16")},
                      **({"target": target} if batch_auto else {})}
    return resolved, derived, messages


def format_not_fitting(plan) -> str:
    """The message of a stage that does not fit: the estimate and what would make it fit."""
    _g = est._g
    mem, dev = plan.memory, plan.device
    lines = [f"stage `{plan.name}` needs about {_g(mem.required)} ({_g(mem.peak)} of tensors at its peak, "
             f"in the {mem.phase}, + CUDA context and allocator headroom) and {dev.label} has {dev.memory_gib:.1f} GiB"]
    for k, v in mem.parts.items():
        lines.append(f"    {k:<22} {_g(v):>10}   {mem.details.get(k, '')}")
    fixes = [s for s in plan.suggestions if s[2]]
    if fixes:
        lines.append("  changes that fit (estimated peak):")
        lines += [f"    - {text}: {_g(peak)}" for text, peak, _ in fixes]
    others = [s for s in plan.suggestions if not s[2]]
    if others and not fixes:
        lines.append("  changes that help but do not fit alone:")
        lines += [f"    - {text}: {_g(peak)}" for text, peak, _ in others]
    if plan.smallest is not None:
        lines.append(f"  or a bigger GPU: {plan.smallest.label} ({plan.smallest.memory_gib:.0f} GiB) is the smallest that fits as configured")
    else:
        lines.append("  no single GPU in the table fits it as configured")
    return "\n".join(lines)


def probe_micro_batch(step: Callable[[int, bool], None], batch: int, grad_accum: int, *, target: int | None,
                      gradient_checkpointing: bool, gc_auto: bool, enable_gc: Callable[[], None] | None = None,
                      budget_bytes: float | None = None, extra_bytes: float = 0.0, fraction: float = 1.0) -> dict:
    """Run one forward/backward at `batch` rows (step(batch, gc)), measure torch.cuda.max_memory_allocated,
    and back off on out-of-memory: checkpoint every layer (when auto; `enable_gc` does it), then halve the
    micro-batch (raising gradient accumulation to keep `target` rows per step; a fixed micro-batch is never
    changed). `fraction`: the share of layers checkpointed now, when gradient_checkpointing is on.

    `extra_bytes` (the optimizer state, which does not exist yet) is added to the measured peak before
    comparing with `budget_bytes`. Returns {"per_device_train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "gradient_checkpointing_fraction", "probe_peak_gib"}; raises UserError when even
    the smallest choice fails."""
    import torch

    gc = gradient_checkpointing
    sizes = _divisors_desc(target) if target else [batch]
    sizes = [s for s in sizes if s <= batch] or [batch]
    i = 0
    while True:
        b = sizes[i]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        oom = False
        try:
            step(b, gc)
            peak = torch.cuda.max_memory_allocated()
            oom = budget_bytes is not None and peak + extra_bytes > budget_bytes
        except torch.cuda.OutOfMemoryError:
            oom, peak = True, None
        if not oom:
            ga = target // b if target else grad_accum
            return {"per_device_train_batch_size": b, "gradient_accumulation_steps": ga,
                    "gradient_checkpointing": gc, "gradient_checkpointing_fraction": fraction,
                    "probe_peak_gib": round(peak / hardware.GIB, 3)}
        torch.cuda.empty_cache()
        if gc_auto and not (gc and fraction == 1.0):
            log.info("probe: micro-batch %d ran out of memory with %s: checkpointing every layer", b,
                     f"{fraction:g} of the layers checkpointed" if gc else "no checkpointing")
            gc, fraction = True, 1.0
            if enable_gc is not None:
                enable_gc()
            continue
        if target and i + 1 < len(sizes):
            log.info("probe: micro-batch %d ran out of memory: trying %d", b, sizes[i + 1])
            i += 1
            continue
        raise UserError(f"one training step at micro-batch {b} does not fit this GPU"
                        + ("" if peak is None else f" ({peak / hardware.GIB:.1f} GiB measured)"),
                        key="per_device_train_batch_size",
                        hint="run `lmpipeline estimate CONFIG --gpu NAME` for the changes that make it fit")


def sft_probe_step(model, cfg, data, tokenizer, objective, device) -> Callable[[int, bool], None]:
    """step(micro_batch, checkpointing): one forward/backward of the heaviest micro-batch of epoch 0 at that
    size (the longest padded rows, or the fullest packed bins), gradients dropped afterwards."""
    import contextlib

    import torch

    dtype = torch.bfloat16 if cfg.bf16 is True else torch.float16 if cfg.fp16 else None
    lengths = [len(e) for e in data.train]
    wrapped = cfg.packing and cfg.packing_strategy == "wrapped"

    def cost(idx: list[int]) -> int:
        if cfg.packing or cfg.padding_free is True:  # one row of all the tokens
            return sum(lengths[i] for i in idx)
        return len(idx) * max(lengths[i] for i in idx)

    def step(b: int, gc: bool) -> None:
        trial = cfg.model_copy(update={"per_device_train_batch_size": b, "gradient_checkpointing": gc})
        plan, _ = make_batch_plans(trial, data, tokenizer)
        batches = plan.epoch_batches(0)
        ga = trial.gradient_accumulation_steps
        # Only the steps this run takes (a 20-step run never meets its epoch's heaviest micro-batch, and a
        # probe of it would set the process's peak above the run's own), at most PROBE_STEPS of them.
        steps = min(PROBE_STEPS, planned_steps(trial, len(batches), 1)[1], -(-len(batches) // ga))
        if plan.regroup is not None:  # micro_batch_tokens: the micro-batches the loop will really run
            batches = [mb for pos in range(steps) for mb in plan.step_batches(0, pos, ga)]
        else:
            batches = batches[:steps * ga]
        worst = batches[0] if wrapped else max(batches, key=cost)  # wrapped rows are all full
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in plan.collate(worst).items()}
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        try:
            with ctx:
                loss, _ = objective.loss(model, batch, float(max(objective.count(batch), 1)))
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return step


def probe_sft(model, cfg, data, tokenizer, objective) -> tuple[Any, dict]:
    """On a GPU, one forward/backward of the heaviest micro-batch of epoch 0 at the auto-chosen size,
    backing off on out-of-memory. Returns (config with the confirmed values, notes for run.json).
    The RNG state is restored, so the run's dropout and data order do not depend on the probe."""
    import torch

    auto = dict(getattr(cfg, "_auto", {}) or {})
    if not auto or not torch.cuda.is_available():
        return cfg, {}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Every rank must run the same micro-batch: keep the estimate's choice rather than probe per rank.
        log.info("[%s] several processes: auto values from the estimate, no probe step", cfg.stage_name)
        return cfg, {}
    device = torch.device("cuda", torch.cuda.current_device())
    step = sft_probe_step(model, cfg, data, tokenizer, objective, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_param, _ = est._optimizer_bytes_per_param(cfg.optim, 4 if cfg.use_lora else 2 if (cfg.bf16 is True or cfg.fp16) else 4)
    budget = hardware.max_peak_for(hardware.usable_memory_bytes(torch.cuda.get_device_properties(device), device.index))
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    model.train()
    try:
        found = probe_micro_batch(
            step, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
            target=auto.get("target") if auto.get("per_device_train_batch_size") else None,
            gradient_checkpointing=bool(cfg.gradient_checkpointing), gc_auto=bool(auto.get("gradient_checkpointing")),
            fraction=cfg.gradient_checkpointing_fraction, enable_gc=lambda: enable_gradient_checkpointing(model),
            budget_bytes=budget,
            extra_bytes=trainable * per_param)
    finally:
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
        torch.cuda.empty_cache()
    changed = {k: v for k, v in found.items() if k != "probe_peak_gib" and getattr(cfg, k) != v}
    if changed:
        log.info("[%s] probe step: changed %s", cfg.stage_name, changed)
        cfg = cfg.model_copy(update=changed)
        cfg._auto = auto
    log.info("[%s] probe step at micro-batch %d: %.2f GiB peak (+ %.2f GiB optimizer state to come)",
             cfg.stage_name, found["per_device_train_batch_size"], found["probe_peak_gib"],
             trainable * per_param / hardware.GIB)
    return cfg, {**found, "changed_by_probe": changed}
