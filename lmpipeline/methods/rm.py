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
No reference model, no LM head over the vocabulary: one forward of 2B rows per micro-batch (`COST`).

Lengths use the common max_seq_length (TRL's max_length) and max_prompt_length, with the pair rules of
data/preference.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.data.preference import PreferenceData, collate_pairs, make_item_plans
from lmpipeline.data.types import TokenizedPair
from lmpipeline.errors import UserError
from lmpipeline.methods.costs import MethodCost
from lmpipeline.models import loading

COST = MethodCost(trained_rows=2, lm_head=False)


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


def build_model(cfg: RMConfig, model_name_or_path: str, tokenizer, *, torch_dtype: str = "auto"):
    """A reward model on `model_name_or_path`: AutoModelForSequenceClassification, one label, the
    tokenizer's pad token in its config (the pooling reads it), then LoRA (SEQ_CLS) when use_lora."""
    from transformers import AutoModelForSequenceClassification

    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; a reward model finds each row's last token by it",
                        key=f"stage_configs.{cfg.stage_name or 'rm'}.pad_token",
                        hint="set pad_token (a token the replies never end with, when the vocabulary has one)")
    model = loading.load_model(model_name_or_path, cfg, torch_dtype=torch_dtype,
                               auto_class=AutoModelForSequenceClassification, num_labels=1,
                               pad_token_id=tokenizer.pad_token_id)
    if cfg.use_lora:
        model = loading.apply_lora(model, cfg, task_type="SEQ_CLS")
    return model


def load_reward_model(folder: str | Path, *, base: str | None = None, torch_dtype=torch.float32):
    """A trained reward model from its final/ folder, in eval mode: full weights, or a SEQ_CLS adapter over
    the base its adapter_config.json names (or `base`)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter = folder / "adapter_config.json"
    if not adapter.exists():
        return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch_dtype).eval(), tokenizer
    base = base or json.loads(adapter.read_text()).get("base_model_name_or_path")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch_dtype,
                                                               pad_token_id=tokenizer.pad_token_id)
    return PeftModel.from_pretrained(model, str(folder)).eval(), tokenizer


__all__ = ["RMConfig", "RMObjective", "bradley_terry_loss", "centering_penalty", "collate_rm", "make_rm_plans",
           "check_margins", "build_model", "load_reward_model", "COST"]
