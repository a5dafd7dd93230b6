"""What would make a stage fit a GPU it does not: each single change (checkpointing, a smaller
micro-batch, a shorter length, 4-bit, an 8-bit optimizer...) with the peak it gives, and the smallest
combination that fits; `lmpipeline estimate` and the fit check before loading print them."""

from __future__ import annotations

from dataclasses import replace

from lmpipeline.config.presets import Architecture
from lmpipeline.plan import hardware
from lmpipeline.plan.estimate import Setup, TokenProfile, estimate_memory



def suggestions(arch: Architecture, setup: Setup, device: hardware.GPU, profile: TokenProfile | None = None,
                rows_seen: int | None = None) -> list[tuple[str, float, bool]]:
    """Changes that lower the peak, each with its new peak and whether it fits `device`: (text, peak, fits)."""
    out: list[tuple[str, float, bool]] = []
    current = estimate_memory(arch, setup, profile, rows_seen).peak

    def add(text: str, **changes):
        est = estimate_memory(arch, replace(setup, **changes), profile, rows_seen)
        if est.peak < current:  # a change that does not lower the peak here is not offered
            out.append((text, est.peak, hardware.fits(est.peak, device)))

    if not setup.gradient_checkpointing:
        add("gradient_checkpointing: true, gradient_checkpointing_fraction: 0.5 (half the layers)",
            gradient_checkpointing=True, checkpoint_fraction=0.5)
        add("gradient_checkpointing: true", gradient_checkpointing=True, checkpoint_fraction=1.0)
    elif setup.checkpoint_fraction < 1.0:
        add("gradient_checkpointing_fraction: 1.0 (every layer)", checkpoint_fraction=1.0)
    if not setup.terms.scores_completions and setup.loss_path == "full_logits" and not setup.liger and setup.impl == "lmpipeline":
        add("chunked_loss: true (trained positions through the LM head in chunks, no full logits)", loss_path="auto")
    if setup.terms.packs_rows and (setup.packing or setup.padding_free) and setup.attn == "sdpa":
        add("attn_implementation: varlen (no block mask over packed rows)", attn="varlen")
    if setup.use_lora and setup.quant == "none":
        add("use_4bit: true (QLoRA)", quant="4bit")
    if not setup.use_lora:
        add("use_lora: true", use_lora=True)
        add("use_lora: true + use_4bit: true (QLoRA)", use_lora=True, quant="4bit")
        if setup.optim in ("adamw_torch", "adamw", "adamw_torch_fused"):
            add("optim: adamw_8bit", optim="adamw_8bit")
    if setup.micro_batch > 1:
        b = max(1, setup.micro_batch // 2)
        ga = setup.grad_accum * setup.micro_batch // b
        add(f"per_device_train_batch_size: {b}, gradient_accumulation_steps: {ga} (same global batch)",
            micro_batch=b, grad_accum=ga)
        if b > 1:
            add(f"per_device_train_batch_size: 1, gradient_accumulation_steps: {setup.grad_accum * setup.micro_batch}",
                micro_batch=1, grad_accum=setup.grad_accum * setup.micro_batch)
    if setup.seq_len > 512:
        add(f"max_seq_length: {setup.seq_len // 2}", seq_len=setup.seq_len // 2)
    combo = dict(gradient_checkpointing=True, checkpoint_fraction=1.0, micro_batch=1, grad_accum=setup.grad_accum * setup.micro_batch)
    if setup.use_lora and setup.quant == "none":
        combo["quant"] = "4bit"
    if not setup.terms.scores_completions and setup.impl == "lmpipeline" and setup.loss_path == "full_logits":
        combo["loss_path"] = "auto"
    if len(combo) > 1:
        add("all of: " + ", ".join(f"{k}={v}" for k, v in combo.items()), **combo)
    return out
