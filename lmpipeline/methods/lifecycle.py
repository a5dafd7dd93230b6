"""The training-stage lifecycle every method runs, once, in this order:

    1. seed; the method checks its config (`check`)
    2. auto values resolved and the GPU fit checked before any weight loads (plan/stage_plan.py)
    3. the tokenizer; the data read and tokenised (a bad dataset fails before minutes of loading)
    4. torch_compile: auto decided from the run's length
    5. the model loaded where the method starts (`load_model`); Liger; the method's adapters and
       reference (`prepare_model`); gradient checkpointing; the trainable share logged
    6. under the training speed-ups (varlen attention, compiled layers; undone afterwards): the method's
       objective, its probe step on a GPU, the accelerator, its reference pass, its batch plans, and the
       shared loop (lmpipeline/train/loop.py)
    7. the final model gathered and saved atomically (`save`), a StageResult returned

A method supplies a recipe: an object with the hooks below (`TrainingRecipe`), built fresh for each
run from the stage config. The lifecycle owns the order; a recipe owns what differs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, ContextManager, Protocol

from lmpipeline.context import StageResult
from lmpipeline.errors import UserError
from lmpipeline.models import loading
from lmpipeline.models.speedups import TrainingSpeedups, resolve_torch_compile
from lmpipeline.plan import autofit, stage_plan
from lmpipeline.train.loop import train
from lmpipeline.train.runtime import full_state_dict, make_accelerator, seed_everything

log = logging.getLogger(__name__)


class TrainingRecipe(Protocol):
    """What a method tells the lifecycle. `cfg` is replaced by the lifecycle as values resolve."""

    method: Any  # its Method (lmpipeline/methods/method.py)
    cfg: Any

    def check(self) -> None:
        """Refuse a config the method cannot run (before anything is loaded)."""

    def model_reference(self) -> str | None:
        """The weights the stage starts from (auto-fit reads its architecture), None for an in-memory model."""

    def tokenizer_source(self) -> str:
        """Where to load the tokenizer from when none is given."""

    def build_data(self, tokenizer) -> Any:
        """The stage's data (with `.summary()` and `.describe()`)."""

    def rows_per_epoch(self, data) -> int:
        """Micro-batch rows in one epoch (torch_compile: auto counts the run's optimizer steps from it)."""

    def load_model(self, model, torch_dtype: str):
        """The starting model: loaded from disk (model None), or the one given; reference copies of it."""

    def prepare_model(self, model):
        """Adapters and dropout: the model to train (Liger is already applied)."""

    def speedups(self, model) -> TrainingSpeedups:
        """The training speed-ups for this model; the method may read their layout (`varlen`)."""

    def objective(self, model):
        """The loop's Objective (count units, return the loss normalised over the global batch)."""

    def probe(self, model, data, tokenizer, objective) -> dict:
        """On a GPU, one real step at the auto-chosen size (may update self.cfg); notes for run.json."""

    def before_plans(self, model, data, tokenizer, accelerator, objective) -> None:
        """Work between the accelerator and the batch plans (a reference model to its device, a precomputed
        reference pass)."""

    def batch_plans(self, data, tokenizer, accelerator):
        """(train plan, eval plan or None) for this rank."""

    def during_training(self, model) -> ContextManager:
        """A context held around the loop (NEFTune's noise hook)."""

    def save(self, model, tokenizer, final_dir: Path, state_dict: dict | None) -> None:
        """Write the final model (main process only)."""

    def notes(self) -> dict:
        """Facts for run.json's stage entry (how the reference was formed, the probe's result...)."""


def run_training(recipe: TrainingRecipe, *, model=None, tokenizer=None, torch_dtype: str = "auto",
                 resume: bool = False, data=None) -> tuple[StageResult, Any, Any]:
    """Train one stage; returns (result, the trained model unwrapped, the tokenizer)."""
    cfg = recipe.cfg
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    recipe.check()
    if autofit.has_auto(cfg):
        # Python API use (the pipeline resolves these first): auto values and the GPU fit check, before data
        # batching and weight loading, so nothing below sees `auto`.
        recipe.cfg, _, _ = stage_plan.prepare_stage(cfg, recipe.method, model=recipe.model_reference(),
                                                    torch_dtype=torch_dtype)
    if tokenizer is None:
        cfg = recipe.cfg
        tokenizer = loading.load_tokenizer(recipe.tokenizer_source(), eos_token=cfg.eos_token,
                                           pad_token=cfg.pad_token, trust_remote_code=cfg.trust_remote_code)
    data = data or recipe.build_data(tokenizer)
    log.info("[%s] data: %s", recipe.cfg.stage_name, data.summary())
    recipe.cfg = resolve_torch_compile(recipe.cfg, recipe.rows_per_epoch(data))

    if model is None:
        loading.quantization_config(recipe.cfg)  # fails now, with the key, if QLoRA is asked for without a GPU
    model = recipe.load_model(model, torch_dtype)
    cfg = recipe.cfg
    if cfg.use_liger_kernel:
        loading.apply_liger(model, loss_only=cfg.torch_compile)
    model = recipe.prepare_model(model)
    if cfg.gradient_checkpointing:
        loading.enable_gradient_checkpointing(model, cfg.gradient_checkpointing_fraction)
    log_trainable(model)

    with recipe.speedups(model):
        objective = recipe.objective(model)
        probe = recipe.probe(model, data, tokenizer, objective)
        accelerator = make_accelerator(recipe.cfg, out)
        recipe.before_plans(model, data, tokenizer, accelerator, objective)
        train_plan, eval_plan = recipe.batch_plans(data, tokenizer, accelerator)
        try:
            with recipe.during_training(model):
                result = train(model=model, cfg=recipe.cfg, objective=objective, train_plan=train_plan,
                               eval_plan=eval_plan, output_dir=out, accelerator=accelerator, tokenizer=tokenizer,
                               resume=resume)
        finally:
            accelerator.end_training()

    final_dir = out / "final"
    state_dict = full_state_dict(accelerator, model)  # sharded runs: a gather every rank joins
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        recipe.save(unwrapped, tokenizer, final_dir, state_dict)
    accelerator.wait_for_everyone()
    cfg = recipe.cfg
    notes = {**({"autofit": probe} if probe else {}), **recipe.notes()}
    stage_result = StageResult(cfg.stage_name or recipe.method.name, out, final_dir, dict(result.metrics),
                               result.global_step, data.describe(), adapter=cfg.use_lora, notes=notes)
    return stage_result, unwrapped, tokenizer


def checked_config(config, config_class: type, stage_class: str):
    """The config a stage class was given, if it is of its method's class and says where to write."""
    if not isinstance(config, config_class):
        raise TypeError(f"{stage_class} needs a {config_class.__name__}, got {type(config).__name__}")
    if not config.output_dir:
        raise UserError("no output_dir given", key="output_dir")
    return config


def log_trainable(model) -> None:
    """Log the trainable share of the parameters; refuse a model with nothing to train."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    if not math.isfinite(trainable) or trainable == 0:
        raise UserError("nothing to train: no parameter requires a gradient")


def save_final(model, tokenizer, final_dir: Path, state_dict: dict | None = None, **save_kwargs) -> None:
    """Write the stage's model atomically: adapter (or full weights) and tokenizer, safetensors only.

    `state_dict`: the gathered full weights when the model is sharded across ranks (FSDP2, ZeRO-3);
    `save_kwargs` go to save_pretrained (e.g. selected_adapters for a stacked adapter).
    """
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        save_kwargs["state_dict"] = state_dict
    model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
