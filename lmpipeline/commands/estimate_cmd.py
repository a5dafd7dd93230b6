"""`lmpipeline estimate CONFIG [--gpu NAME] [--json]`: peak GPU memory, time and the smallest GPU that fits,
per training stage, before anything is downloaded or loaded (lmpipeline/plan/estimate.py).

Exit 0; 1 when --gpu is given and a stage does not fit that GPU (the changes that would make it fit are
printed); 2 for config errors.
"""

from __future__ import annotations

import argparse
import json

from lmpipeline.plan import hardware
from lmpipeline.methods import method_for
from lmpipeline.plan.estimate import GIB, _g, _n, fmt_seconds
from lmpipeline.config.presets import resolve_architecture
from lmpipeline.plan.generation_plan import DEFAULT_PROMPT_TOKENS, GenerationPlan, plan_generation
from lmpipeline.plan.stage_plan import StagePlan, plan_config


def _describe_setup(plan: StagePlan) -> str:
    s, m = plan.setup, plan.memory
    if s.use_lora:
        method = {"4bit": "QLoRA 4-bit", "8bit": "LoRA on an 8-bit base", "none": "LoRA"}[s.quant]
        n_mod = len({t for t in (s.lora_targets if isinstance(s.lora_targets, list) else [s.lora_targets])})
        targets = "all linear layers" if s.lora_targets == "all-linear" else f"{n_mod} module kinds"
        method += f" r{s.lora_r} on {targets} ({_n(m.trainable)} trainable)"
    else:
        method = f"full fine-tuning ({_n(m.trainable)} trainable)"
    plural = "" if s.micro_batch == 1 else "s"
    per = s.terms.rows_per_unit
    rows = f"{s.micro_batch} {s.terms.unit}{plural}" + (f" ({per} rows each)" if per > 1 else "")
    if s.packing:
        layout = "packed"
    elif s.padding_free:  # varlen rows: the examples (DPO: the pairs' sequences) end to end, no padding
        layout = "end to end without padding" + (", each pair's prompt once" if s.shared_prompt else "")
    else:
        layout = f"padded to the longest row, ~{m.row_len} tokens at the peak"
    prec = "bf16/fp16 autocast" if s.autocast else "fp32"
    regrouped = ""
    if s.micro_batch_tokens and s.grad_accum > 1:
        regrouped = f" regrouped into micro-batches of at most {s.micro_batch_tokens:,} tokens"
    return (f"{method}, {s.optim}, {prec}, micro-batch {rows} x GA {s.grad_accum}{regrouped}, max_seq_length {s.seq_len} "
            f"({layout}; {m.tokens:,} tokens), checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
            f"attention {s.attn}" + (", Liger" if s.liger else ""))


def format_plan(plan: StagePlan) -> str:
    lines = [f"[{plan.name}] {plan.method.name} stage"]
    if plan.reason:
        lines.append(f"  no estimate: {plan.reason}")
        lines += [f"  note: {n}" for n in plan.notes]
        return "\n".join(lines)
    a, m, t = plan.arch, plan.memory, plan.time
    lines.append(f"  model     {a.name}: {_n(a.total_params)} parameters ({a.num_layers} layers, hidden {a.hidden_size}, "
                 f"MLP {a.intermediate_size}, {a.num_heads}/{a.num_kv_heads} heads, vocab {a.vocab_size:,}"
                 f"{', tied embeddings' if a.tied_embeddings else ''})")
    lines.append(f"            from {a.source}")
    lines.append(f"  training  {_describe_setup(plan)}")
    for key, value in plan.resolved.items():
        lines.append(f"  auto      {key} -> {value}")
    lines.append(f"  data      {plan.profile.source}" + (f"; {plan.profile.rows:,} rows" if plan.profile.rows else ""))
    lines.append(f"  memory    peak of torch.cuda.max_memory_allocated, in the {m.phase}:")
    for k, v in m.parts.items():
        lines.append(f"    {k:<22}{v / GIB:>8.2f} GiB   {m.details.get(k, '')}")
    lines.append(f"    {'= peak':<22}{m.peak / GIB:>8.2f} GiB")
    head = m.required - m.peak
    lines.append(f"    {'+ headroom':<22}{head / GIB:>8.2f} GiB   CUDA context {hardware.CUDA_CONTEXT_GIB} GiB + allocator "
                 f"{hardware.ALLOCATOR_FRACTION:.0%} (min {hardware.ALLOCATOR_MIN_GIB} GiB)")
    lines.append(f"    {'= needs':<22}{m.required / GIB:>8.2f} GiB")
    for k, v in m.off_peak.items():
        if v > 0:
            lines.append(f"    (not at the peak: {k} {_g(v)}{'; ' + m.details[k] if k in m.details and k not in m.parts else ''})")
    speed_gpu = plan.device or hardware.gpu("h100-80gb")
    lines.append(f"  time      ~{t.tokens_per_second:,.0f} tokens/s on {speed_gpu.label} ({t.flops_per_token / 1e9:.1f} GFLOP/token "
                 f"at {t.mfu:.1%} of {speed_gpu.matmul_tflops:.0f} TFLOP/s)")
    if t.seconds_per_epoch is not None:
        lines.append(f"            one epoch ~{fmt_seconds(t.seconds_per_epoch)} ({t.tokens_per_epoch:,.0f} tokens, "
                     f"{t.steps_per_epoch:,} steps)")
    if t.seconds_total is not None:
        lines.append(f"            whole stage ~{fmt_seconds(t.seconds_total)} ({t.total_steps:,} steps, "
                     f"{t.total_tokens:,.0f} tokens; {t.basis})")
    else:
        lines.append(f"            whole stage: unknown ({t.basis})")
    table = "  ".join(f"{g.name} {'yes' if ok else 'no'}" for g, ok in plan.table)
    lines.append(f"  fits      {table}")
    if plan.smallest:
        lines.append(f"  smallest  {plan.smallest.label} ({plan.smallest.memory_gib:.0f} GiB)")
    else:
        lines.append("  smallest  none: no single GPU in the table fits it as configured")
    if plan.device is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"  on {plan.device.name}: {verdict} ({_g(m.required)} needed of {plan.device.memory_gib:.1f} GiB)")
        for text, peak, ok in plan.suggestions:
            lines.append(f"    - {text}: peak {_g(peak)} -> {'fits' if ok else 'still too big'}")
    for n in dict.fromkeys(m.notes + plan.notes):
        lines.append(f"  note      {n}")
    return "\n".join(lines)


def estimate_command(config: str, overrides: list[str], *, gpu: str | None = None, as_json: bool = False,
                     read_data: bool = True) -> int:
    from lmpipeline.config.loader import load_config
    from lmpipeline.errors import UserError

    cfg = load_config(config, overrides)
    device = None
    if gpu:
        try:
            device = hardware.gpu(gpu)
        except ValueError as e:
            raise UserError(str(e), key="--gpu") from None
    plans = plan_config(cfg, method_for, device=device, read_data=read_data)
    generating = generation_plans(cfg, device)
    if as_json:
        print(json.dumps([p.as_dict() for p in plans + generating], indent=2, default=str))
    else:
        print(f"estimate for {config} (one GPU; per-device figures also hold for each GPU of a data-parallel run)")
        if not plans:
            print("  no training stages")
        for p in plans:
            print(format_plan(p))
        for g in generating:
            print(format_generation(g))
        derived = {k: v for k, v in cfg._derived.items() if k != "preset_sources"}
        if derived:
            print("derived by presets: " + ", ".join(f"{k}={v}" for k, v in derived.items()))
    return 1 if device is not None and any(p.fits is False for p in plans + generating) else 0


def generation_plans(cfg, device) -> list[GenerationPlan]:
    """One plan per stage that generates (eval with a golden set), sized by its own settings."""
    arch = resolve_architecture(cfg.model_name_or_path, preset=getattr(cfg, "preset", None))
    if arch is None:
        return []
    lengths = [cfg.stage(n).max_seq_length for n in cfg.stages if method_for(n) is not None]
    out = []
    for name in cfg.stages:
        if cfg.stage_kinds.get(name) != "eval" or not cfg.stage(name).golden_set:
            continue
        stage = cfg.stage(name)
        out.append(plan_generation(name, arch, slots=stage.generation_batch_size, max_new_tokens=stage.max_new_tokens,
                                   prompt_tokens=max(lengths, default=DEFAULT_PROMPT_TOKENS), device=device))
    return out


def format_generation(plan: GenerationPlan) -> str:
    e = plan.engine
    lines = [f"[{plan.name}] generation (the engine: {plan.slots} slots of up to {plan.max_len:,} tokens)",
             f"    weights                 {_g(plan.weights):>10}   inference dtype, adapters unmerged",
             f"    kv cache                {_g(e.kv_cache):>10}",
             f"    sampling + slot state   {_g(e.sampling + e.slot_state):>10}",
             f"    prefill pass            {_g(e.prefill):>10}",
             f"    = peak                  {_g(plan.peak):>10}"]
    if plan.device is not None:
        lines.append(f"  on {plan.device.name}: {'fits' if plan.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "estimate", help="peak GPU memory, time and the smallest GPU per training stage",
        description="Estimate each training stage's peak GPU memory (weights, adapters, gradients, optimizer, "
                    "activations, logits), its time, and the smallest GPU it fits, without loading the model. "
                    "Hub models not available offline are matched to shipped architecture configs.")
    p.add_argument("config", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--gpu", metavar="NAME", help=f"check the fit on this GPU: {', '.join(hardware.GPU_NAMES)}")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.add_argument("--no-data", action="store_true", help="do not read the dataset for row counts and lengths")
    p.set_defaults(func=lambda a: estimate_command(a.config, a.overrides, gpu=a.gpu, as_json=a.json,
                                                   read_data=not a.no_data))
    return p
