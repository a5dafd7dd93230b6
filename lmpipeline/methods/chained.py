"""What the recipes and stage classes of chained methods (KTO, ORPO, reward models) share: the start
after an earlier stage (methods/start.ChainedStart), dropout off, padded rows, the adapter chain saved
with the final model, and the `Stage(config).execute(...)` Python API over the shared lifecycle.

A method's recipe subclasses `ChainedRecipe` and supplies build_data, objective and batch_plans (and
overrides what else differs: KTO its reference, a reward model its loading).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from lmpipeline.context import StageOutput, StageResult
from lmpipeline.methods.lifecycle import checked_config, run_training
from lmpipeline.methods.reference import disable_dropout
from lmpipeline.methods.start import ChainedStart
from lmpipeline.models.speedups import TrainingSpeedups

log = logging.getLogger(__name__)


class ChainedRecipe:
    """The lifecycle hooks (methods/lifecycle.TrainingRecipe) a chained method without DPO's layouts shares."""

    stage_class = "Stage"  # how messages name the Python API class

    def __init__(self, method, cfg, model_name_or_path: str | None, previous: StageOutput | None, *,
                 has_model: bool):
        self.method = method
        self.cfg = cfg
        self.start = ChainedStart(model_name_or_path, previous, has_model=has_model, key=self.key(""))
        self.objective_used = None
        self._notes: dict = {}

    def key(self, name: str) -> str:
        return f"stage_configs.{self.cfg.stage_name or self.method.name}.{name}"

    def check(self) -> None:
        self.start.resolve(self.cfg, self.stage_class)

    def model_reference(self) -> str | None:
        return self.start.point.base

    def tokenizer_source(self) -> str:
        return self.start.tokenizer_source(self.stage_class)

    def rows_per_epoch(self, data) -> int:
        return len(data.train)

    def load_model(self, model, torch_dtype: str):
        return self.start.load(model, self.cfg, torch_dtype)

    def add_adapter(self, model):
        return self.start.add_adapter(model, self.cfg)

    def prepare_model(self, model, *, others=()):
        """The method's adapter, then dropout off in the policy (and `others`, a frozen reference), as TRL's
        disable_dropout=True: a preference loss compares forwards that must see the same network."""
        model = self.add_adapter(model)
        dropped = disable_dropout(model) + sum(disable_dropout(m) for m in others if m is not None)
        if dropped:
            log.info("dropout disabled in %d modules", dropped)
        self._notes = {**self.start.notes(), "dropout_disabled_modules": dropped}
        return model

    def speedups(self, model) -> TrainingSpeedups:
        # Padded rows: these objectives read no cu_seq_lens, so varlen attention stays off.
        return TrainingSpeedups(model, self.cfg, packed=False)

    def probe(self, model, data, tokenizer, objective) -> dict:
        return {}  # auto values come from the estimate; these methods are not probed on the GPU

    def before_plans(self, model, data, tokenizer, accelerator, objective) -> None:
        return None

    def during_training(self, model):
        return nullcontext()

    def save(self, model, tokenizer, final_dir: Path, state_dict: dict | None) -> None:
        self.start.save(model, tokenizer, final_dir, state_dict, self.cfg, self.cfg.stage_name or self.method.name)

    def notes(self) -> dict:
        return self._notes


class ChainedStage:
    """`Stage(config).execute(model, tokenizer, previous=...)` -> StageResult, for a `recipe_class`."""

    recipe_class: type = ChainedRecipe
    config_class: type = object

    def __init__(self, config):
        self.config = checked_config(config, self.config_class, type(self).__name__)

    def execute(self, model=None, tokenizer=None, *, model_name_or_path: str | None = None,
                torch_dtype: str = "auto", resume: bool = False, previous: StageOutput | None = None,
                data=None) -> StageResult:
        """Train. `previous`: an earlier stage's output (an SFT adapter or full weights); `data` skips
        reading and tokenising."""
        recipe = self.recipe_class(self.config, model_name_or_path, previous, has_model=model is not None)
        try:
            result, self.model, self.tokenizer = run_training(recipe, model=model, tokenizer=tokenizer,
                                                              torch_dtype=torch_dtype, resume=resume, data=data)
        finally:
            self.config = recipe.cfg
        self.objective = recipe.objective_used
        return result


__all__ = ["ChainedRecipe", "ChainedStage"]
