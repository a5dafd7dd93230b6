"""Preference optimisation: DPO and its loss family, with LoRA, QLoRA or full fine-tuning.

Supported
    losses       sigmoid (DPO), ipo, hinge, robust, simpo; cDPO label smoothing for sigmoid
                 (lmpipeline/methods/losses.py cites each paper and equation).
    training     LoRA, QLoRA (4/8-bit base, GPU only), full fine-tuning; padded batches; gradient
                 accumulation and several processes through the shared loop (a pair is the unit the
                 loss is normalised by, over the whole global batch).
    data         every preference format of the data layer (lmpipeline/data/preference.py).
    metrics      TRL's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
                 rewards/margins, logps/chosen, logps/rejected (eval_ prefixed at evaluation).

One forward per micro-batch: chosen and rejected rows are concatenated along the batch dimension
(TRL's layout), or under varlen attention laid end to end in one row with each pair's prompt once,
read by both replies (share_prompt; data/preference.py's layouts), and the log-prob of each sequence
is the sum over its COMPLETION tokens only (the prompt and the padding never count). When the
model's logits are lm_head(last hidden state) (checked once on a real row; Llama, Qwen, Mistral,
Phi... but not Gemma-2's soft-capping), only completion positions go through the LM head, in chunks,
with a recomputing backward (`TokenLogps`): no [rows, length, vocab] logits are ever held. Otherwise
the model's logits are read with cross_entropy from the first position that predicts a completion
token onwards (`logits_to_keep`); the kernels are methods/logprobs.py's. The fused path keeps a
3B QLoRA DPO step at about 6.5 GiB instead of 10.8 (bench/README.md).

Where the model starts (`DPOStage.execute`): the method chains (methods/start.py): the base, an
earlier stage's adapters merged into it (`from_previous_stage: merge`, default) or stacked under the
new one (`stack`), or an earlier full fine-tune as the base.

The reference model (`reference`, auto by default)
    LoRA/QLoRA, merge       the same model with the adapter disabled = base + merged SFT = the SFT
                            model (no second copy in memory).
    LoRA, stack             only the frozen "sft" adapter active = the SFT model.
    full fine-tuning        a frozen deep copy of the starting model (eval mode, no gradients).
    frozen_copy             forces the copy, also under LoRA (costs a second model in memory).
    simpo                   none: SimPO is reference-free (no reference forward at all).
    precompute_ref_log_probs  the reference above runs once over train and eval pairs before
                            training; the values are cached on disk (methods/ref_cache.py) and
                            carried in the batches; the frozen copy, if any, is freed.

Dropout is switched off in the whole model (as TRL's `disable_dropout=True`, its default): the
policy and reference forwards must see the same network, or the step-0 loss is not ln 2 and the
rewards are noise. This overrides lora_dropout; the count is logged and kept in the notes.

Outputs: <output_dir>/final holds the DPO adapter (or full weights) + tokenizer. When the adapter was
trained on top of earlier adapters, final/lmpipeline_chain.json lists the base model and the
ordered adapters (earlier stages', then this one's) to apply on it; StageResult.notes records the
start point, the reference, the chain and the reference-cache outcome for run.json.

Raised (UserError, with the config key): no model; QLoRA without a GPU; reference "none" with a
loss that needs one; a reference other than auto/none with simpo; reference "adapter_disabled"
with full fine-tuning; `stack` without LoRA; label_smoothing with ipo or hinge.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from lmpipeline.config.schema import DPOConfig
from lmpipeline.context import StageOutput, StageResult
from lmpipeline.data.build import load_examples
from lmpipeline.data.cache import tokenizer_fingerprint
from lmpipeline.data.preference import (
    PAIR_LAYOUTS,
    PreferenceData,
    build_preference_data,
    make_pair_plans,
    pair_as_example,
    pair_collator,
    pair_layout,
    pairs_digest,
)
from lmpipeline.errors import UserError
from lmpipeline.methods import losses, ref_cache, reference
from lmpipeline.methods.lifecycle import checked_config, run_training
from lmpipeline.methods.logprobs import (
    choose_logps_path,
    completion_logps,
    packed_completion_logps,
    unwrap,
)
from lmpipeline.methods.method import InspectView, Method
from lmpipeline.methods.reference import broadcast, disable_dropout, gather_ordered
from lmpipeline.methods.start import STACK_REFERENCE_ADAPTER, ChainedStart, StartPoint, only_adapters
from lmpipeline.models.speedups import TrainingSpeedups
from lmpipeline.plan.estimate import EstimatorTerms
from lmpipeline.train.loop import autocast_for

log = logging.getLogger(__name__)

# How the objective obtains reference log-probs.
REFERENCE_MODES = ("adapter_disabled", "adapter", "frozen_copy", "precomputed", "none")


class DPOObjective:
    """The loop's Objective for preference pairs: count = pairs, loss = sum of per-pair losses / total pairs.

    `reference`: "adapter_disabled" (PEFT model, adapters off), "adapter" (only `ref_adapters`
    active, for stacked adapters), "frozen_copy" (`ref_model`), "precomputed" (batch carries
    ref_chosen_logps / ref_rejected_logps) or "none" (reference-free losses).
    """

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, *, reference: str = "adapter_disabled", ref_model=None,
                 ref_adapters: list[str] | None = None):
        self.params = losses.LossParams(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        losses.check_params(loss_type, self.params)
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if loss_type in losses.REFERENCE_FREE:
            reference = "none"
        elif reference == "none":
            raise ValueError(f"loss_type `{loss_type}` needs a reference model")
        if reference == "frozen_copy" and ref_model is None:
            raise ValueError("reference 'frozen_copy' needs ref_model")
        if reference == "adapter" and not ref_adapters:
            raise ValueError("reference 'adapter' needs ref_adapters")
        self.loss_type = loss_type
        self.reference = reference
        self.ref_model = ref_model
        self.ref_adapters = ref_adapters
        self._paths: dict[int, str] = {}

    @classmethod
    def from_config(cls, cfg: DPOConfig, **kwargs) -> "DPOObjective":
        return cls(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, **kwargs)

    def count(self, batch: dict) -> int:
        return int(batch["pairs"])

    def sequence_logps(self, model, batch: dict):
        """(summed completion log-probs, completion lengths) of every row of the batch."""
        path = self._paths.get(id(model))
        if path is None:
            path = self._paths[id(model)] = choose_logps_path(model, batch)
        if "cu_seq_lens" in batch:
            return packed_completion_logps(model, batch, fused=path == "fused")
        return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                fused=path == "fused", logits_to_keep=path != "logits_full")

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """Reference log-probs of every row [2 x pairs], without gradients (model = the policy)."""
        if self.reference in ("precomputed", "none"):
            raise RuntimeError(f"reference_logps called with reference={self.reference!r}")
        with torch.no_grad():
            if self.reference == "frozen_copy":
                return self.sequence_logps(self.ref_model, batch)[0]
            inner = unwrap(model)
            if self.reference == "adapter_disabled":
                ctx = inner.disable_adapter()
            else:
                ctx = only_adapters(inner, self.ref_adapters)
            with ctx:
                return self.sequence_logps(model, batch)[0]

    def pair_logps(self, model, batch: dict) -> losses.PairLogps:
        n = self.count(batch)
        ref_chosen = ref_rejected = None
        if self.reference == "precomputed":
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.reference != "none":
            # Before the policy forward: switching stacked adapters must not happen under a live graph.
            ref = self.reference_logps(model, batch)
            ref_chosen, ref_rejected = ref[:n], ref[n:]
        logps, tokens = self.sequence_logps(model, batch)
        return losses.PairLogps(logps[:n], logps[n:], ref_chosen, ref_rejected, tokens[:n], tokens[n:])

    def loss(self, model, batch: dict, total_units: float):
        lp = self.pair_logps(model, batch)
        per_pair = losses.preference_loss(self.loss_type, lp, self.params)
        chosen_r, rejected_r = losses.rewards(self.loss_type, lp, self.params)
        # Sums as device tensors: the loop reads a step's metrics once, after its last backward.
        metrics = {
            "loss": per_pair.detach().sum(),
            "rewards/chosen": chosen_r.detach().sum(),
            "rewards/rejected": rejected_r.detach().sum(),
            "rewards/accuracies": (chosen_r > rejected_r).sum(),
            "rewards/margins": (chosen_r - rejected_r).detach().sum(),
            "logps/chosen": lp.chosen.detach().sum(),
            "logps/rejected": lp.rejected.detach().sum(),
            "units": self.count(batch),
        }
        return per_pair.sum() / total_units, metrics


# ----------------------------------------------------------------------------------------------
# Where the policy starts


def compute_reference_logps(objective: DPOObjective, model, pairs, cfg: DPOConfig, tokenizer,
                            accelerator, *, layout: str = "padded") -> np.ndarray:
    """Reference log-probs [pairs, 2] in pair order; each process computes its share of batches.
    `layout`: the micro-batch layout training uses (preference.PAIR_LAYOUTS)."""
    device = accelerator.device
    collate = pair_collator(cfg, tokenizer, layout)
    bsz = cfg.per_device_eval_batch_size
    batches = [list(range(s, min(s + bsz, len(pairs)))) for s in range(0, len(pairs), bsz)]
    mine = batches[accelerator.process_index::accelerator.num_processes]
    out: dict[int, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    for idx in mine:
        chosen = [pairs[i] for i in idx]
        batch = collate(chosen)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        # The loop's own precision context, so precomputed values equal on-the-fly ones.
        with autocast_for(cfg, device):
            ref = objective.reference_logps(model, batch).double().cpu().numpy()
        n = len(idx)
        for j, i in enumerate(idx):
            out[i] = (float(ref[j]), float(ref[n + j]))
    model.train(was_training)
    out = gather_ordered(out, accelerator)
    return np.asarray([out[i] for i in range(len(pairs))], dtype=np.float64).reshape(len(pairs), 2)



class DPORecipe:
    """DPO's part of the training-stage lifecycle (methods/lifecycle.py): where the policy starts, its
    reference, the pair layout, the reference pass and the adapter chain it saves."""

    def __init__(self, cfg: DPOConfig, model_name_or_path: str | None, previous: StageOutput | None, *,
                 has_model: bool):
        self.cfg = cfg
        self.method = METHOD
        self.start = ChainedStart(model_name_or_path, previous, has_model=has_model,
                                  key=f"stage_configs.{cfg.stage_name or 'dpo'}.")
        self.layout = "padded"  # preference.pair_layout, once the speed-ups are known
        self.mode = "none"
        self.ref_model = None
        self.in_memory = has_model
        self.torch_dtype = "auto"
        self._notes: dict = {}

    def _key(self, name: str) -> str:
        return f"stage_configs.{self.cfg.stage_name or 'dpo'}.{name}"

    def check(self) -> None:
        cfg = self.cfg
        try:
            losses.check_params(cfg.loss_type, losses.LossParams(cfg.beta, cfg.label_smoothing, cfg.simpo_gamma))
        except ValueError as e:
            raise UserError(str(e), key=self._key("label_smoothing")) from None
        if "simpo_gamma" in cfg.model_fields_set and cfg.loss_type != "simpo":
            log.warning("simpo_gamma is only used by loss_type: simpo; loss_type is %s", cfg.loss_type)
        self.start.resolve(cfg, "DPOStage")

    def model_reference(self) -> str | None:
        return self.start.point.base

    def tokenizer_source(self) -> str:
        return self.start.tokenizer_source("DPOStage")

    def build_data(self, tokenizer) -> PreferenceData:
        return build_preference_data(self.cfg, tokenizer)

    def rows_per_epoch(self, data: PreferenceData) -> int:
        return len(data.train)

    def load_model(self, model, torch_dtype: str):
        cfg = self.cfg
        self.torch_dtype = torch_dtype
        model = self.start.load(model, cfg, torch_dtype)
        self.mode = reference_mode(cfg, stacked=self.start.stacked, key=self._key("reference"))
        if self.mode == "frozen_copy":  # copied before any patch or adapter: the starting model itself
            self.ref_model = copy.deepcopy(model).eval()
            self.ref_model.requires_grad_(False)
        return model

    def prepare_model(self, model):
        cfg = self.cfg
        model = self.start.add_adapter(model, cfg)
        dropped = disable_dropout(model) + (disable_dropout(self.ref_model) if self.ref_model is not None else 0)
        if dropped:
            log.info("dropout disabled in %d modules (policy and reference must be the same network)", dropped)
        self._notes = {
            "loss_type": cfg.loss_type,
            "beta": cfg.beta,
            **self.start.notes(),
            "reference": describe_reference(self.mode, self.start.point, self.in_memory),
            "dropout_disabled_modules": dropped,
            "ref_cache": "off",
        }
        return model

    def speedups(self, model) -> TrainingSpeedups:
        cfg = self.cfg
        # Varlen attention (GPU, or asked for) puts each micro-batch's sequences end to end in one row:
        # no padding, same log-probs. Undone after training (generation pads on the left).
        # eager_rounding: the reference pass (no gradients) must round as the policy's forward does.
        speed = TrainingSpeedups(model, cfg, packed=True, others=[self.ref_model], eager_rounding=True)
        self.layout = pair_layout(cfg, packed=speed.varlen)
        log.info("[%s] pairs: %s", cfg.stage_name, PAIR_LAYOUTS[self.layout])
        if self.layout == "padded" and "share_prompt" in cfg.model_fields_set and cfg.share_prompt:
            log.warning("share_prompt needs varlen attention (a CUDA GPU of compute capability 8.0 or newer and "
                        "attn_implementation auto or varlen); the pairs are padded rows here")
        return speed

    def objective(self, model) -> DPOObjective:
        self.objective_used = DPOObjective.from_config(self.cfg, reference=self.mode, ref_model=self.ref_model,
                                                       ref_adapters=[STACK_REFERENCE_ADAPTER] if self.start.stacked
                                                       else None)
        return self.objective_used

    def probe(self, model, data, tokenizer, objective) -> dict:
        return {}  # auto values come from the estimate; pairs are not probed on the GPU

    def before_plans(self, model, data, tokenizer, accelerator, objective) -> None:
        if self.ref_model is not None:
            self.ref_model.to(accelerator.device)
        self.ref_train = self.ref_eval = None
        if self.cfg.precompute_ref_log_probs and self.mode != "none":
            ref, hit, key = self._precompute(objective, model, data, tokenizer, accelerator)
            self.ref_train, self.ref_eval = ref.train, ref.eval
            self._notes.update(ref_cache="hit" if hit else "miss", ref_cache_key=key,
                               reference=self._notes["reference"] + ", precomputed once before training")
            objective.reference, objective.ref_model = "precomputed", None
            self.ref_model = None  # the frozen copy is no longer needed during training

    def batch_plans(self, data, tokenizer, accelerator):
        return make_pair_plans(self.cfg, data, tokenizer, rank=accelerator.process_index,
                               world=accelerator.num_processes, ref_train=self.ref_train, ref_eval=self.ref_eval,
                               layout=self.layout)

    def during_training(self, model):
        return nullcontext()

    def save(self, model, tokenizer, final_dir: Path, state_dict: dict | None) -> None:
        self.start.save(model, tokenizer, final_dir, state_dict, self.cfg, self.cfg.stage_name or "dpo")

    def notes(self) -> dict:
        return self._notes

    def _precompute(self, objective, model, data, tokenizer, accelerator):
        cfg, mode = self.cfg, self.mode
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            model.to(accelerator.device)
        settings = reference_settings(cfg, mode, self.torch_dtype, layout=self.layout)
        if self.in_memory:  # no files name the weights: hash the reference's state_dict (LoRA weights left out)
            inner = objective.ref_model if mode == "frozen_copy" else unwrap(model)
            reference = ref_cache.reference_fingerprint(model=inner, settings=settings, skip="lora_")
        else:
            reference = ref_cache.reference_fingerprint(base=self.start.point.base, adapters=self.start.point.chain,
                                                        settings=settings)
        data_fp = {"train": pairs_digest(data.train), "eval": pairs_digest(data.eval), "data": data.fingerprint,
                   "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": cfg.max_seq_length,
                   "max_prompt_length": cfg.max_prompt_length}
        key = ref_cache.cache_key(reference, data_fp)
        ref = ref_cache.load(key) if accelerator.is_main_process else None
        ref = broadcast(ref, accelerator)
        if ref is not None and len(ref.train) == len(data.train) and (
                (ref.eval is None) == (not data.eval) and (ref.eval is None or len(ref.eval) == len(data.eval))):
            log.info("reference log-probs read from cache (%s, key %s)", ref_cache.ref_cache_dir(), key)
            return ref, True, key
        log.info("computing reference log-probs for %d train and %d eval pairs (cache miss, key %s)",
                 len(data.train), len(data.eval or []), key)
        ref = ref_cache.RefLogps(compute_reference_logps(objective, model, data.train, cfg, tokenizer, accelerator,
                                                         layout=self.layout),
                                 compute_reference_logps(objective, model, data.eval, cfg, tokenizer, accelerator,
                                                         layout=self.layout)
                                 if data.eval else None)
        if accelerator.is_main_process:
            path = ref_cache.save(key, ref, {"reference": reference, "data": data_fp})
            if path is not None:
                log.info("reference log-probs cached in %s", path)
        accelerator.wait_for_everyone()
        return ref, False, key


def reference_mode(cfg: DPOConfig, *, stacked: bool, key: str) -> str:
    """How the objective obtains reference log-probs for this config (REFERENCE_MODES), or a UserError
    for a combination that cannot work. `stacked`: the previous adapter is kept frozen under the new one."""
    return reference.reference_mode(cfg, stacked=stacked, key=key, reference_free=cfg.loss_type in losses.REFERENCE_FREE,
                                    loss=f"loss_type {cfg.loss_type}",
                                    none_hint="use reference: auto, or loss_type: simpo for a reference-free loss")


class DPOStage:
    """`DPOStage(config).execute(model, tokenizer, previous=...)` -> StageResult."""

    def __init__(self, config: DPOConfig):
        self.config = checked_config(config, DPOConfig, "DPOStage")
        self.layout = "padded"  # set by execute: preference.pair_layout

    @property
    def packed(self) -> bool:
        """Sequences end to end in one row under varlen attention (either packed layout)."""
        return self.layout != "padded"

    def execute(self, model=None, tokenizer=None, *, model_name_or_path: str | None = None,
                torch_dtype: str = "auto", resume: bool = False, previous: StageOutput | None = None,
                data: PreferenceData | None = None) -> StageResult:
        """Train; see the module docstring for the start point and the reference. `previous` is an earlier
        stage's output (an SFT adapter or full weights); `data` skips reading and tokenising."""
        recipe = DPORecipe(self.config, model_name_or_path, previous, has_model=model is not None)
        try:
            result, self.model, self.tokenizer = run_training(recipe, model=model, tokenizer=tokenizer,
                                                              torch_dtype=torch_dtype, resume=resume, data=data)
        finally:
            self.config, self.layout = recipe.cfg, recipe.layout
        self.objective = recipe.objective_used
        return result


def reference_settings(cfg: DPOConfig, mode: str, torch_dtype, *, layout: str) -> dict:
    """Everything besides weights and data that changes the reference log-probs, for the cache key.

    The kernels count, not only the precision: a policy compiled by torch_compile (or patched by Liger)
    rounds differently from an eager reference, and over ~300 completion tokens in bf16 that moved
    a step-0 DPO loss from 0.6931 to 0.7164 on Llama-3.2-3B QLoRA (bench/README.md), when a
    compiled run read the reference an eager run had cached."""
    return {"mode": mode, "torch_dtype": torch_dtype, "use_4bit": cfg.use_4bit, "use_8bit": cfg.use_8bit,
            "bnb": [cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype],
            "attn_implementation": cfg.attn_implementation, "layout": layout, "bf16": cfg.bf16, "fp16": cfg.fp16,
            "torch_compile": cfg.torch_compile, "use_liger_kernel": cfg.use_liger_kernel,
            # compiled layers round as eager (models/compile.EAGER_ROUNDING); caches from before that differ
            "compiled_rounding": "eager" if cfg.torch_compile is True else None}


def describe_reference(mode: str, start: StartPoint, in_memory: bool) -> str:
    if mode == "none":
        return "none (reference-free loss)"
    if mode == "frozen_copy":
        return "frozen copy of the starting model" + (" (= SFT model)" if start.chain else "")
    if mode == "adapter":
        return f"only the frozen '{STACK_REFERENCE_ADAPTER}' adapter active (= SFT model)"
    if start.stack is not None:
        return "all adapters disabled (= the base before the SFT adapter)"
    return "adapter disabled (= SFT model)" if start.chain else "adapter disabled (= starting model)"


def planned_reference(cfg: DPOConfig) -> str:
    """The reference a config runs with, before any model exists (reference.planned_reference); none for a
    reference-free loss."""
    return reference.planned_reference(cfg, reference_free=cfg.loss_type in losses.REFERENCE_FREE)


def inspect_pairs(cfg: DPOConfig, tokenizer, n: int) -> InspectView:
    pairs = build_preference_data(cfg, tokenizer).train
    items = [(str(pair.source), "", [("chosen", pair_as_example(pair, "chosen")), ("rejected", pair_as_example(pair, "rejected"))])
             for pair in pairs[:n]]
    return InspectView(items, [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])


def validate_pairs(cfg: DPOConfig, tokenizer):
    """Every row read (on_invalid relaxed, so each problem is reported); pairs are tokenised by the run."""
    _, _, report, fmts = load_examples(cfg, on_invalid="skip")
    return fmts, report


METHOD = Method(
    name="dpo", aliases=("trl_dpo",), config_class=DPOConfig, stage=DPOStage,
    summary="preference optimisation on chosen/rejected pairs (DPO, IPO, hinge, robust DPO, SimPO)",
    data="preference", start="chain", reference=planned_reference,
    terms=EstimatorTerms(rows_per_unit=2, unit="pair", varlen_by_default=True, shares_prompt=True,
                         scores_completions=True),
    inspect=inspect_pairs, validate_data=validate_pairs,
    title="preference optimisation (DPO family)", card_keys=("loss_type", "beta"),
)


__all__ = ["DPOObjective", "DPOStage", "DPORecipe", "METHOD", "compute_reference_logps", "planned_reference",
           "reference_mode", "reference_settings"]
