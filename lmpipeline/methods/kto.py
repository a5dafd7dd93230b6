"""KTO: Kahneman-Tversky Optimisation on unpaired desirable/undesirable examples (Ethayarajh et al. 2024,
arXiv:2402.01306), with LoRA, QLoRA or full fine-tuning.

Supported
    data         the `kto` format (prompt/completion/label, or messages + label; label true/false or 1/0),
                 and every preference format, each pair becoming a desirable (chosen) and an undesirable
                 (rejected) example (data/unpaired.py).
    loss         KTO (the paper's eq. 7, TRL's loss_type "kto") with desirable_weight / undesirable_weight.
    reference    as for DPO (methods/dpo.py): the policy with its adapter disabled (LoRA), only the frozen
                 earlier adapter active (stacked), a frozen copy (full fine-tuning), or precomputed once.
    metrics      TRL 1.16's names: loss, kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen,
                 logps/rejected (eval_ prefixed at evaluation), through `derive_metrics` (below).

The loss (`kto_loss`). For an example (x, y) with log-ratio r = log pi(y|x) - log pi_ref(y|x):
    desirable     lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable   lambda_U * (1 - sigmoid(beta * (z0 - r)))
the paper's L_KTO = E[lambda_y - v(x, y)], eq. 7, where z0 is the reference point
    z0 = max(0, mean_i (log pi(y_j|x_i) - log pi_ref(y_j|x_i)))      (`kl_reference_point`)
over mismatched pairs: each prompt of the micro-batch with another example's completion, the paper's
estimate of KL(pi || pi_ref) from the same micro-batch (TRL's KL_completion_ids: completion i-1 for
prompt i). z0 carries no gradient (as TRL: the KL rows run under no_grad, the mean is detached).
The loss is summed over examples and divided by the examples of the whole global batch (the loop's
Objective contract): one micro-batch gives TRL's mean. z0 is estimated per micro-batch from its own rows;
TRL also averages it over processes (a gather each micro-batch), which this loop does not do.

One micro-batch runs: the policy on the B examples (with gradients), the policy on the B KL rows (without),
and the reference on all 2B rows (without; none when precomputed). `COST` states it for the estimator.

Raised: ValueError (the objective) for an unknown reference mode or a missing reference model; the config
refuses per_device_train_batch_size 1 (the KL rows would be the examples themselves), like TRL.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.methods.costs import MethodCost
from lmpipeline.methods.dpo import DPOObjective

# One unit = one example: its row with gradients, its KL row without, and the reference on both.
COST = MethodCost(trained_rows=1, no_grad_rows=1, reference_rows=2, reference=True)


class KTOConfig(TrainStageConfig):
    """Kahneman-Tversky optimisation on unpaired desirable/undesirable examples."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    beta: float = Field(0.1, gt=0, description="KTO temperature: how sharply the value function saturates "
                        "around the reference point (TRL's beta).")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of a desirable example's loss. With "
                                    "unequal counts, keep desirable_weight x desirable / (undesirable_weight x "
                                    "undesirable) within [1, 4/3] (the paper's advice, as TRL warns).")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of an undesirable example's loss.")
    max_prompt_length: Optional[int] = Field(
        None, gt=0, description="Prompt tokens kept (left-truncated); rest of max_seq_length for the completion."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once (each example and its fixed KL row), cache and reuse them."
    )
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = Field(
        "auto", description="How the reference is formed (auto: disabled adapter for LoRA, frozen copy otherwise)."
    )
    from_previous_stage: Literal["merge", "stack"] = Field(
        "merge", description="After SFT: merge its adapter into the base (default) or stack a new one."
    )

    @model_validator(mode="after")
    def _kl_needs_two(self):
        if self.per_device_train_batch_size != "auto" and self.per_device_train_batch_size < 2:
            raise ValueError("per_device_train_batch_size must be at least 2 for KTO: the KL reference point pairs "
                             "each prompt with another example's completion in the same micro-batch")
        return self


# ----------------------------------------------------------------------------------------------
# The loss


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi - log pi_ref)) over the mismatched rows (KTO's reference point; TRL's `kl`), detached."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO, Ethayarajh et al. 2024, eq. 7: lambda_y - v(x, y) per example, shape (examples,).

    logratios: log pi(y|x) - log pi_ref(y|x), summed over completion tokens; desirable: bool labels;
    z0: the reference point (kl_reference_point)."""
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    return torch.where(desirable, desirable_loss, undesirable_loss)


# Logged means over one class of examples: numerator and denominator sums (module docstring).
_CLASS_MEANS = {
    "rewards/chosen": ("rewards/chosen_sum", "count/chosen"),
    "rewards/rejected": ("rewards/rejected_sum", "count/rejected"),
    "logps/chosen": ("logps/chosen_sum", "count/chosen"),
    "logps/rejected": ("logps/rejected_sum", "count/rejected"),
}


def derive_metrics(record: dict) -> dict:
    """TRL's per-class means from a logged record of sums (train or eval_ prefixed): the loop divides every
    sum by the same unit count, so a ratio of two logged sums is the ratio of the raw sums. Classes absent
    from the record's batches are left out, as TRL does."""
    out = dict(record)
    for prefix in ("", "eval_"):
        for name, (num, den) in _CLASS_MEANS.items():
            if out.get(prefix + den):
                out[prefix + name] = out[prefix + num] / out[prefix + den]
        if prefix + "rewards/chosen" in out and prefix + "rewards/rejected" in out:
            out[prefix + "rewards/margins"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
    return out


# ----------------------------------------------------------------------------------------------
# The objective


def _rows(batch: dict, start: int, end: int) -> dict:
    return {k: batch[k][start:end] for k in ("input_ids", "attention_mask", "completion_mask")}


class KTOObjective:
    """The loop's Objective for unpaired batches (data/unpaired.py): count = examples, loss = sum of
    per-example losses / the global batch's examples.

    `reference`: "adapter_disabled", "adapter" (with `ref_adapters`), "frozen_copy" (`ref_model`) or
    "precomputed" (the batch carries ref_logps / ref_kl_logps), with DPO's meanings. Log-probs are read
    as DPO reads them (summed over completion tokens, the fused LM head where the model allows): the
    reader is a DPOObjective, used for its log-prob and reference code only.
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, *,
                 reference: str = "adapter_disabled", ref_model=None, ref_adapters: list[str] | None = None):
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.reference = reference
        reader_reference = "adapter_disabled" if reference == "precomputed" else reference
        self.reader = DPOObjective(reference=reader_reference, ref_model=ref_model, ref_adapters=ref_adapters)

    @classmethod
    def from_config(cls, cfg: KTOConfig, **kwargs) -> "KTOObjective":
        return cls(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight, **kwargs)

    def count(self, batch: dict) -> int:
        return int(batch["examples"])

    def reference_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the examples' rows and of their KL rows, each [B], without gradients."""
        n = self.count(batch)
        if self.reference == "precomputed":
            return batch["ref_logps"], batch["ref_kl_logps"]
        ref = self.reader.reference_logps(model, batch)
        return ref[:n], ref[n:]

    def loss(self, model, batch: dict, total_units: float):
        n = self.count(batch)
        # Reference first: switching stacked adapters must not happen under a live graph.
        ref_logps, ref_kl_logps = self.reference_logps(model, batch)
        with torch.no_grad():
            kl_logps = self.reader.sequence_logps(model, _rows(batch, n, 2 * n))[0]
        logps = self.reader.sequence_logps(model, _rows(batch, 0, n))[0]
        z0 = kl_reference_point(kl_logps, ref_kl_logps.to(kl_logps))
        logratios = logps - ref_logps.to(logps)
        desirable = batch["label"].to(device=logps.device, dtype=torch.bool)
        per_example = kto_loss(logratios, desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = self.beta * logratios.detach()
        chosen, rejected = desirable.to(rewards.dtype), (~desirable).to(rewards.dtype)
        # Sums as device tensors (the loop reads a step's metrics once); per-class means: derive_metrics.
        metrics = {
            "loss": per_example.detach().sum(),
            "kl": z0 * n,
            "rewards/chosen_sum": (rewards * chosen).sum(),
            "rewards/rejected_sum": (rewards * rejected).sum(),
            "logps/chosen_sum": (logps.detach() * chosen).sum(),
            "logps/rejected_sum": (logps.detach() * rejected).sum(),
            "count/chosen": chosen.sum(),
            "count/rejected": rejected.sum(),
            "units": n,
        }
        return per_example.sum() / total_units, metrics


__all__ = ["KTOConfig", "KTOObjective", "kto_loss", "kl_reference_point", "derive_metrics", "COST"]
