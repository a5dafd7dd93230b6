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
and the reference on all 2B rows (without; none when precomputed). METHOD.terms states it for the estimator.

The stage (`KTOStage`) chains like DPO (methods/start.py) and forms its reference by DPO's rule
(reference.reference_mode); dropout is off (TRL's disable_dropout). With precompute_ref_log_probs the
reference runs once over every example and its fixed KL row (data/unpaired.py) before training, in
memory (not cached on disk, unlike DPO's).

Raised: ValueError (the objective) for an unknown reference mode or a missing reference model; the config
refuses per_device_train_batch_size 1 (the KL rows would be the examples themselves), like TRL.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.data.unpaired import UnpairedData, build_unpaired_data, make_unpaired_plans, unpaired_as_example, \
    unpaired_collator
from lmpipeline.errors import UserError
from lmpipeline.methods import reference
from lmpipeline.methods.chained import ChainedRecipe, ChainedStage
from lmpipeline.methods.dpo import DPOObjective, describe_reference, validate_pairs
from lmpipeline.methods.method import InspectView, Method
from lmpipeline.methods.start import STACK_REFERENCE_ADAPTER
from lmpipeline.models.speedups import TrainingSpeedups
from lmpipeline.plan.estimate import EstimatorTerms
from lmpipeline.train.loop import autocast_for

log = logging.getLogger(__name__)


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

    def finalize_metrics(self, record: dict) -> dict:
        """TRL's per-class means from the logged sums (the loop's optional Objective hook)."""
        return derive_metrics(record)

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


# ----------------------------------------------------------------------------------------------
# The stage


def compute_reference_logps(objective: KTOObjective, model, items, cfg: KTOConfig, tokenizer,
                            accelerator) -> np.ndarray:
    """Reference log-probs [examples, 2] (the example, its fixed KL row) in data order; each process
    computes its share of batches."""
    collate = unpaired_collator(tokenizer, fixed_partners=True)
    bsz = cfg.per_device_eval_batch_size
    batches = [list(range(s, min(s + bsz, len(items)))) for s in range(0, len(items), bsz)]
    out: dict[int, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    for idx in batches[accelerator.process_index::accelerator.num_processes]:
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in collate(items, idx).items()}
        # The loop's own precision context, so precomputed values equal on-the-fly ones.
        with autocast_for(cfg, accelerator.device):
            ref, ref_kl = objective.reference_logps(model, batch)
        for j, i in enumerate(idx):
            out[i] = (float(ref[j]), float(ref_kl[j]))
    model.train(was_training)
    out = reference.gather_ordered(out, accelerator)
    return np.asarray([out[i] for i in range(len(items))], dtype=np.float64).reshape(len(items), 2)


class KTORecipe(ChainedRecipe):
    """KTO's part of the training-stage lifecycle: unpaired batches with their KL rows, and a reference
    formed as DPO forms it."""

    stage_class = "KTOStage"

    def __init__(self, cfg: KTOConfig, model_name_or_path, previous, *, has_model: bool):
        super().__init__(METHOD, cfg, model_name_or_path, previous, has_model=has_model)
        self.mode = "adapter_disabled"
        self.ref_model = None
        self.in_memory = has_model
        self.ref_train = self.ref_eval = None

    def build_data(self, tokenizer) -> UnpairedData:
        # Auto values are resolved by now: the config's own check saw `auto`, not what auto-fit chose.
        if self.cfg.per_device_train_batch_size < 2:
            raise UserError(f"per_device_train_batch_size is {self.cfg.per_device_train_batch_size}; KTO needs at "
                            "least 2 (the KL reference point pairs each prompt with another example's completion)",
                            key=self.key("per_device_train_batch_size"),
                            hint="set per_device_train_batch_size: 2 (with gradient_checkpointing: true if memory "
                                 "is short)")
        return build_unpaired_data(self.cfg, tokenizer)

    def load_model(self, model, torch_dtype: str):
        model = super().load_model(model, torch_dtype)
        self.mode = reference.reference_mode(self.cfg, stacked=self.start.stacked, key=self.key("reference"),
                                             loss="KTO")
        if self.mode == "frozen_copy":  # copied before any patch or adapter: the starting model itself
            self.ref_model = copy.deepcopy(model).eval()
            self.ref_model.requires_grad_(False)
        return model

    def prepare_model(self, model, *, others=()):
        model = super().prepare_model(model, others=[self.ref_model])
        self._notes.update(beta=self.cfg.beta, desirable_weight=self.cfg.desirable_weight,
                           undesirable_weight=self.cfg.undesirable_weight,
                           reference=describe_reference(self.mode, self.start.point, self.in_memory))
        return model

    def speedups(self, model) -> TrainingSpeedups:
        # eager_rounding: the reference pass (no gradients) must round as the policy's forward does.
        return TrainingSpeedups(model, self.cfg, packed=False, others=[self.ref_model], eager_rounding=True)

    def objective(self, model) -> KTOObjective:
        self.objective_used = KTOObjective.from_config(
            self.cfg, reference=self.mode, ref_model=self.ref_model,
            ref_adapters=[STACK_REFERENCE_ADAPTER] if self.start.stacked else None)
        return self.objective_used

    def before_plans(self, model, data, tokenizer, accelerator, objective) -> None:
        if self.ref_model is not None:
            self.ref_model.to(accelerator.device)
        if not self.cfg.precompute_ref_log_probs:
            return
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            model.to(accelerator.device)
        log.info("computing reference log-probs for %d train and %d eval examples", len(data.train),
                 len(data.eval or []))
        self.ref_train = compute_reference_logps(objective, model, data.train, self.cfg, tokenizer, accelerator)
        if data.eval:
            self.ref_eval = compute_reference_logps(objective, model, data.eval, self.cfg, tokenizer, accelerator)
        self._notes["reference"] += ", precomputed once before training"
        objective.reference = "precomputed"
        objective.reader.ref_model = self.ref_model = None  # the frozen copy is no longer needed

    def batch_plans(self, data, tokenizer, accelerator):
        return make_unpaired_plans(self.cfg, data, tokenizer, rank=accelerator.process_index,
                                   world=accelerator.num_processes, ref_train=self.ref_train, ref_eval=self.ref_eval)


class KTOStage(ChainedStage):
    """`KTOStage(config).execute(model, tokenizer, previous=...)` -> StageResult."""

    recipe_class = KTORecipe
    config_class = KTOConfig


def planned_reference(cfg: KTOConfig) -> str:
    """The reference a KTO config runs with (DPO's rule; KTO's loss always needs one)."""
    return reference.planned_reference(cfg)


def inspect_examples(cfg: KTOConfig, tokenizer, n: int) -> InspectView:
    items = build_unpaired_data(cfg, tokenizer).train
    rows = [(str(e.source), "desirable" if e.label else "undesirable", [("", unpaired_as_example(e))])
            for e in items[:n]]
    header = "trained: the completion of each example (prompt shown, not trained); a pair gives two examples"
    return InspectView(rows, [len(e.prompt_ids) + len(e.completion_ids) for e in items], header=header)


METHOD = Method(
    name="kto", aliases=("trl_kto",), config_class=KTOConfig, stage=KTOStage,
    summary="Kahneman-Tversky optimisation on unpaired desirable/undesirable examples (or preference pairs)",
    data="unpaired", start="chain", reference=planned_reference,
    # One unit = one example: its row with gradients, its KL row without, and the reference on both.
    terms=EstimatorTerms(rows_per_unit=1, unit="example", scores_completions=True, no_grad_rows=1,
                         reference_rows=2),
    inspect=inspect_examples, validate_data=validate_pairs,
    title="Kahneman-Tversky optimisation (KTO)", card_keys=("beta", "desirable_weight", "undesirable_weight"),
)


__all__ = ["KTOConfig", "KTOObjective", "KTORecipe", "KTOStage", "METHOD", "kto_loss", "kl_reference_point",
           "derive_metrics", "compute_reference_logps", "planned_reference"]
