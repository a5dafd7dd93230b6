"""Reward models: a scalar head on the base model, trained on preference pairs with the Bradley-Terry
loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1; the margin of Touvron et al. 2023, Llama 2,
arXiv:2307.09288, sec. 3.2.2), with LoRA, QLoRA or full fine-tuning.

Supported
    data         every preference format, as for DPO (data/preference.py): padded pairs, chosen rows then
                 rejected rows, each row prompt + reply rendered with the chat template.
    model        AutoModelForSequenceClassification with num_labels=1 on the base (`build_model`): the reward
                 is the head's output at the last non-padding token of each row (transformers' pooling, which
                 finds it from config.pad_token_id; when the pad token is the end-of-turn token, that is the
                 token before the final end of turn, the same at training and at inference). LoRA uses
                 task_type SEQ_CLS, so peft trains and saves the new `score` head (modules_to_save) with the
                 adapter; full fine-tuning trains everything.
    loss         -log sigmoid(r_chosen - r_rejected - m) per pair (`bradley_terry_loss`): m = 0, or with
                 `use_margin` the row's score_chosen - score_rejected (Llama 2's margin; rows without scores
                 are refused). Optional `center_rewards_coefficient` c adds c (r_chosen + r_rejected)^2
                 (Eisenstein et al. 2023, arXiv:2312.09244, eq. 2, as TRL's RewardTrainer), pulling the
                 rewards to mean zero.
    metrics      TRL 1.16's RewardTrainer names: loss, accuracy (r_chosen > r_rejected), margin
                 (r_chosen - r_rejected), mean_reward; eval_ prefixed at evaluation (held-out accuracy).
                 TRL's min_reward / max_reward are extremes, not sums, and are not logged by the loop.

Outputs (the shared lifecycle's save): full fine-tuning, a folder AutoModelForSequenceClassification loads;
LoRA, a PEFT adapter (SEQ_CLS, with the score head) over the base: `load_reward_model` loads either.
No reference model, no LM head over the vocabulary: one forward of 2B rows per micro-batch (METHOD.terms).

The stage (`RMStage`) chains (methods/start.py): after an SFT adapter, that adapter is merged into the
base loaded as a sequence classifier (from_previous_stage: merge; a new score head cannot be stacked
under an adapter), and the reward model's LoRA goes on top. The final folder's lmpipeline_chain.json
then names the SFT adapter, and `load_reward_model` follows it. Dropout is off, as TRL.

Lengths use the common max_seq_length (TRL's max_length) and max_prompt_length, with the pair rules of
data/preference.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.data.preference import PreferenceData, build_preference_data, collate_pairs, make_item_plans
from lmpipeline.data.types import TokenizedPair
from lmpipeline.errors import UserError
from lmpipeline.methods.chained import ChainedRecipe, ChainedStage
from lmpipeline.methods.dpo import inspect_pairs, validate_pairs
from lmpipeline.methods.method import Method, no_reference
from lmpipeline.methods.start import adapter_chain
from lmpipeline.models import loading
from lmpipeline.plan.estimate import EstimatorTerms

log = logging.getLogger(__name__)


class RMConfig(TrainStageConfig):
    """A Bradley-Terry reward model on preference pairs (a sequence-classification head on the base)."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (TRL's RewardConfig default).")
    use_margin: bool = Field(
        False, description="Subtract score_chosen - score_rejected of each row inside the loss (Llama 2's margin); "
        "every row must carry both scores."
    )
    center_rewards_coefficient: Optional[float] = Field(
        None, ge=0, description="c of c x (r_chosen + r_rejected)^2, pulling rewards towards mean zero "
        "(Eisenstein et al. 2023; 0.01 is TRL's suggestion). Off when unset."
    )
    max_prompt_length: Optional[int] = Field(
        None, gt=0, description="Prompt tokens kept (left-truncated); rest of max_seq_length for replies."
    )
    from_previous_stage: Literal["merge"] = Field(
        "merge", description="After SFT: merge its adapter into the base before the score head and a new adapter."
    )


# ----------------------------------------------------------------------------------------------
# The loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(r_w - r_l - m) per pair, shape (pairs,): InstructGPT's eq. 1 (Ouyang et al. 2022), with
    Llama 2's margin m (Touvron et al. 2023, eq. 2) when given."""
    diff = chosen - rejected
    return -F.logsigmoid(diff if margin is None else diff - margin)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float) -> torch.Tensor:
    """c (r_w + r_l)^2 per pair (Eisenstein et al. 2023, eq. 2, as TRL's center_rewards_coefficient)."""
    return coefficient * (chosen + rejected) ** 2


class RMObjective:
    """The loop's Objective for padded pairs (data/preference.py) on a sequence-classification model:
    count = pairs, loss = sum of per-pair losses / the global batch's pairs."""

    def __init__(self, center_rewards_coefficient: float | None = None):
        self.center = center_rewards_coefficient

    @classmethod
    def from_config(cls, cfg: RMConfig) -> "RMObjective":
        return cls(cfg.center_rewards_coefficient)

    def count(self, batch: dict) -> int:
        return int(batch["pairs"])

    def rewards(self, model, batch: dict) -> torch.Tensor:
        """The reward of every row [2B], float32."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()

    def loss(self, model, batch: dict, total_units: float):
        n = self.count(batch)
        rewards = self.rewards(model, batch)
        chosen, rejected = rewards[:n], rewards[n:]
        per_pair = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        if self.center:
            per_pair = per_pair + centering_penalty(chosen, rejected, self.center)
        detached = rewards.detach()
        metrics = {
            "loss": per_pair.detach().sum(),
            "accuracy": (detached[:n] > detached[n:]).sum(),
            "margin": (detached[:n] - detached[n:]).sum(),
            "mean_reward": detached.sum() / 2,
            "units": n,
        }
        return per_pair.sum() / total_units, metrics


# ----------------------------------------------------------------------------------------------
# Data


def check_margins(pairs: list[TokenizedPair], key: str) -> None:
    """use_margin needs both scores on every row: name the first row without."""
    missing = next((p for p in pairs if p.margin is None), None)
    if missing is not None:
        raise UserError(f"{missing.source}: use_margin needs score_chosen and score_rejected on every row", key=key,
                        hint="give scored rows (e.g. ultrafeedback_binarized, or preference rows with both scores), "
                             "or set use_margin: false")


def collate_rm(pairs: list[TokenizedPair], pad_token_id: int, *, use_margin: bool = False) -> dict:
    """collate_pairs' padded layout, plus `margin` [B] (float32) with use_margin."""
    batch = collate_pairs(pairs, pad_token_id)
    if use_margin:
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch


def make_rm_plans(cfg: RMConfig, data: PreferenceData, tokenizer, rank: int = 0, world: int = 1):
    """(train_plan, eval_plan) of padded pairs with their margins (use_margin)."""
    if cfg.use_margin:
        key = f"stage_configs.{cfg.stage_name or 'rm'}.use_margin"
        check_margins(data.train + (data.eval or []), key)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in data.train]
    return make_item_plans(cfg, data.train, data.eval,
                           lambda items, idx, ref: collate_rm([items[i] for i in idx], pad_id, use_margin=cfg.use_margin),
                           lengths=lengths, padded=True, rows_per_item=2, noun="pair", rank=rank, world=world)


# ----------------------------------------------------------------------------------------------
# The model


def load_reward_base(cfg: RMConfig, model_name_or_path: str, tokenizer, *, torch_dtype: str = "auto"):
    """AutoModelForSequenceClassification on `model_name_or_path`: one label, the tokenizer's pad token in its
    config (the pooling reads it)."""
    from transformers import AutoModelForSequenceClassification

    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; a reward model finds each row's last token by it",
                        key=f"stage_configs.{cfg.stage_name or 'rm'}.pad_token",
                        hint="set pad_token (a token the replies never end with, when the vocabulary has one)")
    return loading.load_model(model_name_or_path, cfg, torch_dtype=torch_dtype,
                              auto_class=AutoModelForSequenceClassification, num_labels=1,
                              pad_token_id=tokenizer.pad_token_id)


def build_model(cfg: RMConfig, model_name_or_path: str, tokenizer, *, torch_dtype: str = "auto"):
    """A reward model on `model_name_or_path` (load_reward_base), then LoRA (SEQ_CLS) when use_lora."""
    model = load_reward_base(cfg, model_name_or_path, tokenizer, torch_dtype=torch_dtype)
    if cfg.use_lora:
        model = loading.apply_lora(model, cfg, task_type="SEQ_CLS")
    return model


def merge_adapters(model, adapters: list[Path]):
    """Earlier stages' causal-LM adapters merged into a sequence classifier's backbone: their weights have
    the same names under both heads (the decoder layers), and no adapter trains the score head."""
    from peft import PeftConfig, PeftModel

    for adapter in adapters:
        config = PeftConfig.from_pretrained(str(adapter))
        config.task_type = None  # the plain PeftModel: a CAUSAL_LM wrapper would need the generation head
        model = PeftModel.from_pretrained(model, str(adapter), config=config).merge_and_unload()
        log.info("merged adapter %s into the reward model's base", adapter)
    return model


def load_reward_model(folder: str | Path, *, base: str | None = None, torch_dtype=torch.float32):
    """A trained reward model from its final/ folder, in eval mode: full weights, or a SEQ_CLS adapter over
    the base its chain file or adapter_config.json names (or `base`), earlier stages' adapters merged first."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not (folder / "adapter_config.json").exists():
        return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch_dtype).eval(), tokenizer
    chain_base, chain, _ = adapter_chain(folder)
    model = AutoModelForSequenceClassification.from_pretrained(base or chain_base, num_labels=1, dtype=torch_dtype,
                                                               pad_token_id=tokenizer.pad_token_id)
    model = merge_adapters(model, chain[:-1])
    return PeftModel.from_pretrained(model, str(folder)).eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# The stage


# The model card's example: a reward is the score head's output at a conversation's last token.
SCORE_CODE = (
    'messages = [{"role": "user", "content": "Explain machine learning in one paragraph."},\n'
    '            {"role": "assistant", "content": "Machine learning fits a model to examples."}]\n'
    'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True).to(model.device)\n'
    "print(model(**inputs).logits[0, 0].item())  # higher: the reply is preferred\n"
)


class RMRecipe(ChainedRecipe):
    """The reward model's part of the training-stage lifecycle: a sequence classifier on the start point,
    padded pairs, no reference."""

    stage_class = "RMStage"

    def __init__(self, cfg: RMConfig, model_name_or_path, previous, *, has_model: bool):
        super().__init__(METHOD, cfg, model_name_or_path, previous, has_model=has_model)
        self.tokenizer = None

    def build_data(self, tokenizer) -> PreferenceData:
        self.tokenizer = tokenizer  # the model's config takes its pad token
        return build_preference_data(self.cfg, tokenizer)

    def load_model(self, model, torch_dtype: str):
        if model is not None:  # given in memory: a sequence classifier (an adapter on it is merged)
            return self.start.load(model, self.cfg, torch_dtype)
        point = self.start.point
        return merge_adapters(load_reward_base(self.cfg, point.base, self.tokenizer, torch_dtype=torch_dtype),
                              point.merge)

    def add_adapter(self, model):
        return loading.apply_lora(model, self.cfg, task_type="SEQ_CLS") if self.cfg.use_lora else model

    def prepare_model(self, model, *, others=()):
        model = super().prepare_model(model)
        self._notes.update(reference="none (a reward model has none)", use_margin=self.cfg.use_margin)
        return model

    def objective(self, model) -> RMObjective:
        self.objective_used = RMObjective.from_config(self.cfg)
        return self.objective_used

    def batch_plans(self, data, tokenizer, accelerator):
        return make_rm_plans(self.cfg, data, tokenizer, rank=accelerator.process_index,
                             world=accelerator.num_processes)


class RMStage(ChainedStage):
    """`RMStage(config).execute(model, tokenizer, previous=...)` -> StageResult."""

    recipe_class = RMRecipe
    config_class = RMConfig


METHOD = Method(
    name="rm", aliases=("reward_model", "trl_reward"), config_class=RMConfig, stage=RMStage,
    summary="a Bradley-Terry reward model (a scalar head on the base) trained on chosen/rejected pairs",
    data="preference", start="chain", reference=no_reference,
    terms=EstimatorTerms(rows_per_unit=2, unit="pair", lm_head=False),
    inspect=inspect_pairs, validate_data=validate_pairs,
    title="reward model (Bradley-Terry)", card_keys=("use_margin", "center_rewards_coefficient"),
    model_class="AutoModelForSequenceClassification", usage_example=SCORE_CODE,
    model_kwargs=", num_labels=1, pad_token_id=tokenizer.pad_token_id",
)


__all__ = ["RMConfig", "RMObjective", "bradley_terry_loss", "centering_penalty", "collate_rm", "make_rm_plans",
           "check_margins", "build_model", "load_reward_base", "load_reward_model", "merge_adapters", "RMRecipe",
           "RMStage", "METHOD"]
