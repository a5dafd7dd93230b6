"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of chat, instruction and text data.

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
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.integrations.neftune import activate_neftune

from lmpipeline.config.schema import SFTConfig, padding_free_on
from lmpipeline.context import StageResult
from lmpipeline.data.build import (
    SFTData,
    build_sft_data,
    chat_template_for,
    load_examples,
    make_batch_plans,
    needs_template,
    tokenize_sft,
)
from lmpipeline.data.packing import flash_attn_kwargs
from lmpipeline.errors import UserError
from lmpipeline.methods.lifecycle import checked_config, run_training, save_final
from lmpipeline.methods.logprobs import fused_head_usable, hidden_token_logps
from lmpipeline.methods.method import InspectView, Method, no_reference
from lmpipeline.models import attention, loading
from lmpipeline.models.speedups import TrainingSpeedups
from lmpipeline.plan import autofit
from lmpipeline.plan.estimate import EstimatorTerms

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


class SFTRecipe:
    """SFT's part of the training-stage lifecycle (methods/lifecycle.py)."""

    def __init__(self, cfg: SFTConfig, model_name_or_path: str | None, *, has_model: bool):
        self.cfg = cfg
        self.method = METHOD
        self.start = model_name_or_path
        self.has_model = has_model
        self.neftune = None

    def check(self) -> None:
        if not self.has_model and self.start is None:
            raise UserError("SFTStage.execute needs a model or model_name_or_path")

    def model_reference(self) -> str | None:
        return self.start

    def tokenizer_source(self) -> str:
        return self.start

    def build_data(self, tokenizer) -> SFTData:
        return build_sft_data(self.cfg, tokenizer)

    def rows_per_epoch(self, data: SFTData) -> int:
        """Micro-batch rows in one epoch: examples, or about as many packed rows as the tokens fill (a lower
        bound: bins are never fuller than max_seq_length)."""
        if self.cfg.packing:
            return max(1, math.ceil(sum(len(e) for e in data.train) / self.cfg.max_seq_length))
        return len(data.train)

    def load_model(self, model, torch_dtype: str):
        return model if model is not None else loading.load_model(self.start, self.cfg, torch_dtype=torch_dtype)

    def prepare_model(self, model):
        # A later SFT stage continues the previous stage's adapter (already a PEFT model).
        if self.cfg.use_lora and not hasattr(model, "peft_config"):
            model = loading.apply_lora(model, self.cfg)
        return model

    def speedups(self, model) -> TrainingSpeedups:
        cfg = self.cfg = resolve_padding_free(self.cfg, model)
        packed = cfg.padding_free or (cfg.packing and cfg.packing_strategy in ("bfd", "ffd"))
        return TrainingSpeedups(model, cfg, packed=packed)

    def objective(self, model) -> SFTObjective:
        cfg = self.cfg
        # Liger computes its own fused cross-entropy; otherwise ours whenever the head is a plain Linear.
        objective = SFTObjective(fused=cfg.chunked_loss and not cfg.use_liger_kernel and fused_head_usable(model))
        log.info("[%s] loss: %s", cfg.stage_name, "trained positions only, LM head in chunks" if objective.fused
                 else "the model's own loss over full logits")
        return objective

    def probe(self, model, data, tokenizer, objective) -> dict:
        # On a GPU, one step at the auto-chosen size confirms it fits (backing off on out-of-memory).
        self.cfg, found = autofit.probe_sft(model, self.cfg, data, tokenizer, objective)
        return found

    def before_plans(self, model, data, tokenizer, accelerator, objective) -> None:
        return None

    def batch_plans(self, data, tokenizer, accelerator):
        return make_batch_plans(self.cfg, data, tokenizer, rank=accelerator.process_index,
                                world=accelerator.num_processes)

    @contextmanager
    def during_training(self, model):
        if not self.cfg.neftune_noise_alpha:
            yield
            return
        handle = activate_neftune(model, self.cfg.neftune_noise_alpha)
        try:
            yield
        finally:
            handle.remove()

    def save(self, model, tokenizer, final_dir: Path, state_dict: dict | None) -> None:
        save_final(model, tokenizer, final_dir, state_dict=state_dict)

    def notes(self) -> dict:
        return {}


def resolve_padding_free(cfg: SFTConfig, model) -> SFTConfig:
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


class SFTStage:
    """`SFTStage(config).execute(model, tokenizer)` -> StageResult (the Python API)."""

    def __init__(self, config: SFTConfig):
        self.config = checked_config(config, SFTConfig, "SFTStage")

    def execute(self, model=None, tokenizer=None, *, model_name_or_path: str | None = None,
                torch_dtype: str = "auto", resume: bool = False, data: SFTData | None = None) -> StageResult:
        recipe = SFTRecipe(self.config, model_name_or_path, has_model=model is not None)
        try:
            result, self.model, self.tokenizer = run_training(recipe, model=model, tokenizer=tokenizer,
                                                              torch_dtype=torch_dtype, resume=resume, data=data)
        finally:
            self.config = recipe.cfg
        return result


def inspect_rows(cfg: SFTConfig, tokenizer, n: int) -> InspectView:
    data = build_sft_data(cfg, tokenizer)
    items = [(str(ex.source), f"({len(ex)} tokens, {ex.num_trained} trained)", [("", ex)]) for ex in data.train[:n]]
    header = (f"trained: {'assistant turns' if cfg.assistant_only_loss else 'every token'} "
              f"(assistant_only_loss: {str(cfg.assistant_only_loss).lower()}); a turn's loss_weight, where the data "
              "has one, wins: 0 = shown, not trained; 1 = trained")
    return InspectView(items, [len(e) for e in data.train], f"data: {data.summary()}", data, header)


def validate_rows(cfg: SFTConfig, tokenizer):
    """Every example read and tokenised with on_invalid/on_overlong relaxed, so each problem is reported."""
    examples, eval_examples, report, fmts = load_examples(cfg, on_invalid="skip")
    template = chat_template_for(cfg, tokenizer) if needs_template(examples) else None
    lenient = cfg.model_copy(update={"on_invalid": "skip",
                                     "on_overlong": "truncate" if cfg.on_overlong == "error" else cfg.on_overlong})
    tokenize_sft(examples + (eval_examples or []), lenient, tokenizer, template, report)
    return fmts, report


METHOD = Method(
    name="sft", aliases=("trl_sft",), config_class=SFTConfig, stage=SFTStage,
    summary="supervised fine-tuning on chat, instruction, prompt/completion or plain-text data",
    data="supervised", start="continue", reference=no_reference,
    terms=EstimatorTerms(rows_per_unit=1, unit="row", packs_rows=True),
    inspect=inspect_rows, validate_data=validate_rows,
    title="supervised fine-tuning (SFT)", card_keys=("assistant_only_loss", "completion_only_loss", "packing"),
)
