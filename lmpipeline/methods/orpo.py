"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024, arXiv:2403.07691),
with LoRA, QLoRA or full fine-tuning.

Supported
    data         every preference format, as for DPO (data/preference.py): padded pairs, chosen rows then
                 rejected rows.
    loss         L = L_SFT + lambda * L_OR (the paper's eq. 6), lambda = `beta` (TRL's name):
                   L_SFT  the negative log-likelihood of the chosen reply, a token mean (`nll_loss`)
                   L_OR   -log sigmoid(log odds(y_w|x) - log odds(y_l|x)), eq. 7 (`odds_ratio_loss`),
                          odds(y|x) = P(y|x) / (1 - P(y|x)) with log P(y|x) the log-prob AVERAGED over the
                          completion's tokens (as TRL, and the paper's eq. 4 length normalisation).
    metrics      TRL 1.16's names (trl.experimental.orpo): loss, nll_loss, log_odds_ratio (the mean of
                 log sigmoid(log odds ratio)), log_odds_chosen (the mean log odds ratio), rewards/chosen and
                 rewards/rejected (beta x the average log-prob), rewards/accuracies, rewards/margins,
                 logps/chosen, logps/rejected (average log-probs). TRL's logits/chosen|rejected (the mean of
                 every logit over the vocabulary) are not computed: the fused LM head never builds them.

What L_SFT covers: the chosen completion's tokens (the paper's L_SFT, and what every lmpipeline stage
trains). TRL computes it over the prompt too (labels = every attended token): `nll_on_prompt: true`
does the same, for a run that must match TRL's numbers; it costs a second forward of the chosen rows.

Normalisation: the loop divides by the pairs of the global batch. The odds-ratio term is a sum over
pairs; the NLL term is a token mean within each micro-batch (TRL's), weighted by the micro-batch's share
of the global batch's pairs, so one micro-batch gives exactly TRL's loss and equal micro-batches under
gradient accumulation give TRL's average of micro-batch losses.

No reference model, no reference forward: one forward over the 2B rows per micro-batch (METHOD.terms).

The stage (`ORPOStage`) chains like DPO (methods/start.py: after SFT its adapter is merged, or stacked
under the new one), pads its pairs (no varlen layout) and trains with dropout off, as TRL.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.data.preference import PreferenceData, build_preference_data, make_pair_plans
from lmpipeline.methods.chained import ChainedRecipe, ChainedStage
from lmpipeline.methods.dpo import DPOObjective, inspect_pairs, validate_pairs
from lmpipeline.methods.method import Method, no_reference
from lmpipeline.plan.estimate import EstimatorTerms

_LN_HALF = -math.log(2.0)


class ORPOConfig(TrainStageConfig):
    """Odds-ratio preference optimisation: SFT on the chosen reply plus an odds-ratio penalty, no reference."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    beta: float = Field(0.1, gt=0, description="lambda of the ORPO paper: weight of the odds-ratio term against "
                        "the SFT loss (TRL's beta; the paper's code calls it alpha).")
    max_prompt_length: Optional[int] = Field(
        None, gt=0, description="Prompt tokens kept (left-truncated); rest of max_seq_length for replies."
    )
    nll_on_prompt: bool = Field(
        False, description="Also count the prompt's tokens in the SFT term, as TRL's ORPOTrainer does (default: "
        "the chosen reply's tokens only, the paper's L_SFT)."
    )
    from_previous_stage: Literal["merge", "stack"] = Field(
        "merge", description="After SFT: merge its adapter into the base (default) or stack a new one."
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: log1p(-e^x) below -ln 2, else
    log(-expm1(x)))."""
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log(odds(y_w|x) / odds(y_l|x)) per pair, odds = P / (1 - P) from length-averaged log-probs (ORPO eq. 4)."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """L_OR = -log sigmoid(log odds ratio) per pair, shape (pairs,) (ORPO eq. 7)."""
    return -F.logsigmoid(log_odds_ratio(chosen_avg_logps, rejected_avg_logps))


def orpo_loss(nll: torch.Tensor, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              beta: float) -> torch.Tensor:
    """L_ORPO = L_SFT + lambda * mean L_OR (ORPO eq. 6), for one batch: `nll` is its token-mean NLL."""
    return nll + beta * odds_ratio_loss(chosen_avg_logps, rejected_avg_logps).mean()


class ORPOObjective:
    """The loop's Objective for padded preference pairs (data/preference.py): count = pairs.

    Log-probs are read as DPO reads them (summed over completion tokens, the fused LM head where the model
    allows): the reader is a reference-free DPOObjective, used for its log-prob code only."""

    def __init__(self, beta: float = 0.1, *, nll_on_prompt: bool = False):
        self.beta = beta
        self.nll_on_prompt = nll_on_prompt
        self.reader = DPOObjective(loss_type="simpo", reference="none")

    @classmethod
    def from_config(cls, cfg: ORPOConfig) -> "ORPOObjective":
        return cls(cfg.beta, nll_on_prompt=cfg.nll_on_prompt)

    def count(self, batch: dict) -> int:
        return int(batch["pairs"])

    def chosen_nll(self, model, batch: dict, logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL of the batch's chosen rows: their completions (from the pair forward's sums), or
        with nll_on_prompt every attended token after the first, as TRL (a second forward)."""
        n = self.count(batch)
        if not self.nll_on_prompt:
            return -logps[:n].sum() / tokens[:n].sum().clamp(min=1)
        rows = {k: batch[k][:n] for k in ("input_ids", "attention_mask")}
        rows["completion_mask"] = batch["attention_mask"][:n]
        whole, whole_tokens = self.reader.sequence_logps(model, rows)
        return -whole.sum() / whole_tokens.sum().clamp(min=1)

    def loss(self, model, batch: dict, total_units: float):
        n = self.count(batch)
        logps, tokens = self.reader.sequence_logps(model, batch)
        avg = logps / tokens.clamp(min=1).to(logps.dtype)
        chosen, rejected = avg[:n], avg[n:]
        nll = self.chosen_nll(model, batch, logps, tokens)
        # The micro-batch's TRL loss, weighted by its pairs (module docstring: normalisation).
        loss = orpo_loss(nll, chosen, rejected, self.beta) * n
        ratio = log_odds_ratio(chosen, rejected).detach()
        chosen_r, rejected_r = self.beta * chosen.detach(), self.beta * rejected.detach()
        # Sums as device tensors (the loop divides by the pairs): one micro-batch gives TRL's means.
        metrics = {
            "loss": loss.detach(),
            "nll_loss": nll.detach() * n,
            "log_odds_ratio": F.logsigmoid(ratio).sum(),
            "log_odds_chosen": ratio.sum(),
            "rewards/chosen": chosen_r.sum(),
            "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
            "units": n,
        }
        return loss / total_units, metrics


# ----------------------------------------------------------------------------------------------
# The stage


class ORPORecipe(ChainedRecipe):
    """ORPO's part of the training-stage lifecycle: padded pairs, no reference."""

    stage_class = "ORPOStage"

    def __init__(self, cfg: ORPOConfig, model_name_or_path, previous, *, has_model: bool):
        super().__init__(METHOD, cfg, model_name_or_path, previous, has_model=has_model)

    def build_data(self, tokenizer) -> PreferenceData:
        return build_preference_data(self.cfg, tokenizer)

    def prepare_model(self, model, *, others=()):
        model = super().prepare_model(model)
        self._notes.update(beta=self.cfg.beta, reference="none (ORPO is reference-free)")
        return model

    def objective(self, model) -> ORPOObjective:
        self.objective_used = ORPOObjective.from_config(self.cfg)
        return self.objective_used

    def batch_plans(self, data, tokenizer, accelerator):
        return make_pair_plans(self.cfg, data, tokenizer, rank=accelerator.process_index,
                               world=accelerator.num_processes, layout="padded")


class ORPOStage(ChainedStage):
    """`ORPOStage(config).execute(model, tokenizer, previous=...)` -> StageResult."""

    recipe_class = ORPORecipe
    config_class = ORPOConfig


METHOD = Method(
    name="orpo", aliases=("trl_orpo",), config_class=ORPOConfig, stage=ORPOStage,
    summary="odds-ratio preference optimisation on chosen/rejected pairs: SFT plus an odds-ratio term, no reference",
    data="preference", start="chain", reference=no_reference,
    terms=EstimatorTerms(rows_per_unit=2, unit="pair", scores_completions=True),
    inspect=inspect_pairs, validate_data=validate_pairs,
    title="odds-ratio preference optimisation (ORPO)", card_keys=("beta",),
)


__all__ = ["ORPOConfig", "ORPOObjective", "ORPORecipe", "ORPOStage", "METHOD", "orpo_loss", "odds_ratio_loss",
           "log_odds_ratio", "log1mexp"]
