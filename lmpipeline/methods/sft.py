"""Supervised fine-tuning (seeds 000, 001, 002, 003).

Supports: LoRA / DoRA / rsLoRA adapters, QLoRA (4-bit NF4/FP4) and 8-bit bases on GPU, full
fine-tuning; chat, instruction, prompt/completion and plain-text data (see lmpipeline/data);
assistant-only and completion-only loss; padding-free packing; NEFTune; Liger kernels (GPU).

Loss: token-level cross-entropy summed over trained positions (labels != -100) and divided by the
number of trained tokens in the whole global batch, so gradient accumulation and data parallelism
give the same result as one large batch.

Assumes: a causal LM loadable by transformers' AutoModelForCausalLM.
Raises: UserError (bad paths, QLoRA without GPU, no trainable parameters), DataError/ConfigError
for data and config problems, NonFiniteLossError when the loss or gradients stop being finite.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch

from lmpipeline.config.schema import SFTConfig, padding_free_on
from lmpipeline.context import StageResult
from lmpipeline.data.build import SFTData, build_sft_data, make_batch_plans
from lmpipeline.data.packing import flash_attn_kwargs
from lmpipeline.errors import UserError
from lmpipeline.methods.logprobs import fused_head_usable, hidden_token_logps
from lmpipeline.models import attention, loading
from lmpipeline.models.speedups import TrainingSpeedups, resolve_torch_compile
from lmpipeline.plan import autofit
from lmpipeline.train.loop import train
from lmpipeline.train.runtime import full_state_dict, make_accelerator, seed_everything

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class SFTObjective:
    """Next-token cross-entropy on trained positions, normalised by the global trained-token count.

    fused=True scores only the trained positions through the LM head in chunks
    (logprobs.hidden_token_logps) instead of materialising [tokens, vocab] fp32 logits; the stage
    turns it on whenever the model's logits are a plain lm_head(hidden) and Liger is off. Same loss
    and gradients (tests/unit/methods/test_sft_objective.py).
    """

    reports_perplexity = True

    def __init__(self, fused: bool = False):
        self.fused = fused

    def count(self, batch: dict) -> int:
        # The model predicts labels[:, 1:] from positions [:, :-1]; only those targets count.
        return int((batch["labels"][..., 1:] != -100).sum())

    def loss(self, model, batch: dict, total_units: float):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        inputs.update(flash_attn_kwargs(batch))
        labels = batch["labels"]
        n = self.count(batch)
        if self.fused:
            mask = labels[:, 1:] != -100
            loss = -hidden_token_logps(model, inputs, mask, labels[:, 1:]).sum() / total_units
        else:
            # use_cache=False: with a cache, transformers skips the packed-sequence block mask and packed
            # examples would attend to each other (see tests/unit/data/test_packing.py).
            out = model(**inputs, labels=labels, use_cache=False,
                        num_items_in_batch=torch.tensor(total_units, device=labels.device))
            loss = out.loss
        # The loss sum stays a device tensor: the loop reads the step's metrics once, after its last backward.
        return loss, {"loss": loss.detach() * total_units, "units": n}


def save_final(model, tokenizer, final_dir: Path, state_dict: dict | None = None) -> None:
    """Write the stage's model atomically: adapter (or full weights) and tokenizer, safetensors only.

    `state_dict`: the gathered full weights when the model is sharded across ranks (FSDP2, ZeRO-3).
    """
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


class SFTStage:
    """`SFTStage(config).execute(model, tokenizer)` -> StageResult (seed 001's Python API)."""

    def __init__(self, config: SFTConfig):
        if not isinstance(config, SFTConfig):
            raise TypeError(f"SFTStage needs an SFTConfig, got {type(config).__name__}")
        if not config.output_dir:
            raise UserError("no output_dir given", key="output_dir")
        self.config = config

    @staticmethod
    def _resolve_padding_free(cfg: SFTConfig, model) -> SFTConfig:
        """padding_free: auto becomes true or false once the model is known (schema.padding_free_on)."""
        if cfg.padding_free != "auto":
            return cfg
        varlen_runs = attention.kernel_available() and attention.attention_for(
            model, requested=cfg.attn_implementation, packed=True, max_seq_length=cfg.max_seq_length) is not None
        on = padding_free_on(cfg, varlen_runs)
        if on:
            log.info("[%s] padding_free (auto): each micro-batch's examples end to end in one row, varlen attention",
                     cfg.stage_name)
        return cfg.model_copy(update={"padding_free": on})

    def execute(self, model=None, tokenizer=None, *, model_name_or_path: str | None = None,
                torch_dtype: str = "auto", resume: bool = False, data: SFTData | None = None) -> StageResult:
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        if model is None and model_name_or_path is None:
            raise UserError("SFTStage.execute needs a model or model_name_or_path")
        if autofit.has_auto(cfg):
            # Python API use (the pipeline resolves these first): auto values and the GPU fit check,
            # before data batching and weight loading, so nothing below sees `auto`.
            cfg, _, _ = autofit.prepare_stage(cfg, "sft", model=model_name_or_path, torch_dtype=torch_dtype)
            self.config = cfg
        if tokenizer is None:
            tokenizer = loading.load_tokenizer(model_name_or_path, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
                                               trust_remote_code=cfg.trust_remote_code)
        # Data first: a bad dataset must fail before minutes of weight loading.
        data = data or build_sft_data(cfg, tokenizer)
        log.info("[%s] data: %s", cfg.stage_name, data.summary())
        cfg = self.config = resolve_torch_compile(cfg, _rows_per_epoch(cfg, data))

        if model is None:
            loading.quantization_config(cfg)  # fails now, with the key, if QLoRA is asked for without a GPU
            model = loading.load_model(model_name_or_path, cfg, torch_dtype=torch_dtype)
        if cfg.use_liger_kernel:
            loading.apply_liger(model, loss_only=cfg.torch_compile)
        if cfg.use_lora and not hasattr(model, "peft_config"):
            model = loading.apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            loading.enable_gradient_checkpointing(model, cfg.gradient_checkpointing_fraction)
        _log_trainable(model)
        cfg = self.config = self._resolve_padding_free(cfg, model)
        packed = cfg.padding_free or (cfg.packing and cfg.packing_strategy in ("bfd", "ffd"))
        # Liger computes its own fused cross-entropy; otherwise ours whenever the head is a plain Linear.
        objective = SFTObjective(fused=cfg.chunked_loss and not cfg.use_liger_kernel and fused_head_usable(model))
        log.info("[%s] loss: %s", cfg.stage_name, "trained positions only, LM head in chunks" if objective.fused
                 else "the model's own loss over full logits")
        neftune = None
        with TrainingSpeedups(model, cfg, packed=packed):
            # On a GPU, one step at the auto-chosen size confirms it fits (backing off on out-of-memory).
            cfg, probe = autofit.probe_sft(model, cfg, data, tokenizer, objective)
            self.config = cfg
            accelerator = make_accelerator(cfg, out)
            train_plan, eval_plan = make_batch_plans(cfg, data, tokenizer, rank=accelerator.process_index,
                                                     world=accelerator.num_processes)
            if cfg.neftune_noise_alpha:
                from transformers.integrations.neftune import activate_neftune

                neftune = activate_neftune(model, cfg.neftune_noise_alpha)
            try:
                result = train(model=model, cfg=cfg, objective=objective, train_plan=train_plan, eval_plan=eval_plan,
                               output_dir=out, accelerator=accelerator, tokenizer=tokenizer, resume=resume)
            finally:
                if neftune is not None:
                    neftune.remove()
                accelerator.end_training()

        final_dir = out / "final"
        state_dict = full_state_dict(accelerator, model)  # sharded runs: a gather every rank joins
        if accelerator.is_main_process:
            save_final(accelerator.unwrap_model(model), tokenizer, final_dir, state_dict=state_dict)
        accelerator.wait_for_everyone()
        metrics = dict(result.metrics)
        self.model = accelerator.unwrap_model(model)
        self.tokenizer = tokenizer
        return StageResult(cfg.stage_name or "sft", out, final_dir, metrics, result.global_step, data.describe(),
                           adapter=cfg.use_lora, notes={"autofit": probe} if probe else {})


def _rows_per_epoch(cfg: SFTConfig, data: SFTData) -> int:
    """Micro-batch rows in one epoch: examples, or about as many packed rows as the tokens fill (a lower
    bound: bins are never fuller than max_seq_length)."""
    if cfg.packing:
        return max(1, math.ceil(sum(len(e) for e in data.train) / cfg.max_seq_length))
    return len(data.train)


def _log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    if not math.isfinite(trainable) or trainable == 0:
        raise UserError("nothing to train: no parameter requires a gradient")
