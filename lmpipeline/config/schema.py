"""The typed config schema: one pydantic model per stage kind, and the pipeline that holds them.

Field names follow TRL's SFTConfig/DPOConfig and transformers' TrainingArguments, so a user's
existing config keys keep their meaning. Every field has a
description; `lmpipeline validate` and the README config reference are generated from them.
Unknown keys are errors (extra="forbid"): a misspelt key must never be silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

# Stage kinds and the names that select them. The training kinds come from the method table
# (lmpipeline/methods/__init__.py registers each method's names and config class here); eval, merge
# and package from config/lifecycle.py, at the end of this module.
STAGE_ALIASES: dict[str, str] = {}
STAGE_CONFIG_CLASSES: dict[str, type[BaseModel]] = {}
TRAINING_KINDS: set[str] = set()


def register_stage_kind(kind: str, names: tuple[str, ...], config_class: type[BaseModel], *, trains: bool) -> None:
    """Make `names` select stage kind `kind`, configured by `config_class` (called by the method table)."""
    for name in names:
        if STAGE_ALIASES.get(name, kind) != kind:
            raise ValueError(f"stage name {name!r} already selects {STAGE_ALIASES[name]!r}")
        STAGE_ALIASES[name] = kind
    STAGE_CONFIG_CLASSES[kind] = config_class
    if trains:
        TRAINING_KINDS.add(kind)

OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw",
    "sgd",
    "adafactor",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)
GPU_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is never a usable setting (a NaN learning rate
    # trains a no-op that reports "done"), so every float key refuses one at validation.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class DatasetSpec(_Strict):
    """One source in a mixture (`dataset_name_or_path` may be a list of these)."""

    path: str = Field(description="File, folder, datasets on-disk folder or Hub dataset name.")
    format: Optional[str] = Field(None, description="Row format; auto-detected when unset.")
    split: str = Field("train", description="Split to read for Hub and on-disk datasets.")
    weight: float = Field(1.0, gt=0, description="Sampling weight when mixing several datasets.")
    max_samples: Optional[int] = Field(None, gt=0, description="Keep at most this many rows.")
    column_mapping: Optional[dict[str, str]] = Field(
        None, description="Map canonical names (instruction, output, messages...) to your columns."
    )


class TrainStageConfig(_Strict):
    """Fields every training stage shares: data, optimisation, adapters, precision, logging."""

    stage_name: Optional[str] = Field(None, description="Name of the stage (set by the pipeline).")
    output_dir: Optional[str] = Field(
        None, description="Where this stage writes; the pipeline sets <output_dir>/<stage>."
    )

    # --- data
    dataset_name_or_path: Optional[Union[str, list[DatasetSpec]]] = Field(
        None, description="Training data: a file, folder, Hub name, or a list of sources to mix."
    )
    dataset_format: Optional[str] = Field(
        None, description="Row format (alpaca, messages, sharegpt, text, ...); detected when unset."
    )
    dataset_split: str = Field("train", description="Split of a Hub/on-disk dataset to train on.")
    dataset_text_field: str = Field("text", description="Column holding plain text.")
    column_mapping: Optional[dict[str, str]] = Field(
        None, description="Map canonical names to your columns, e.g. {instruction: question}."
    )
    eval_dataset_name_or_path: Optional[str] = Field(
        None, description="Held-out data for eval loss; else `validation_split_ratio` of the train data."
    )
    validation_split_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training rows held out for evaluation."
    )
    max_samples: Optional[int] = Field(None, gt=0, description="Use at most this many training rows.")
    max_seq_length: int = Field(2048, gt=0, description="Longest tokenised example, in tokens.")
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="Rows that cannot be used: stop with a report, or skip and count them."
    )
    on_overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Examples longer than max_seq_length."
    )
    chat_template_path: Optional[str] = Field(
        None, description="A Jinja chat template file (or tokenizer_config.json holding one)."
    )
    chat_template: Optional[str] = Field(
        None, description="A built-in template name (chatml, llama-3, ...) or literal Jinja."
    )
    eos_token: Optional[str] = Field(None, description="Override the tokenizer's EOS token.")
    pad_token: Optional[str] = Field(None, description="Override the tokenizer's pad token.")

    # --- schedule
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Optimizer steps to run; overrides epochs when > 0.")
    per_device_train_batch_size: Union[int, Literal["auto"]] = Field(
        4, description="Micro-batch size per device; auto: the largest that fits the GPU (memory estimate + "
        "one probe step), keeping the global batch (global_batch_size) by adjusting gradient_accumulation_steps."
    )
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Rows per optimizer step per device (micro-batch x GA) that "
        "per_device_train_batch_size: auto keeps; default 4 x gradient_accumulation_steps."
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Eval batch size per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    micro_batch_tokens: Union[int, Literal["auto"], None] = Field(
        "auto", description="Regroup each optimizer step's rows (micro-batch x GA) into as few micro-batches as "
        "hold at most this many tokens each (padded: rows x longest; padding-free: their sum). Same rows, same "
        "gradient (the loss is normalised over the whole step); short rows run in fewer, larger passes. auto: "
        "per_device_train_batch_size x max_seq_length tokens (DPO: x 2, a pair is two sequences), the most a "
        "configured micro-batch can already hold, so the peak memory is that of its worst case. null: run the micro-batches as configured."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    on_nonfinite: Literal["error", "skip"] = Field(
        "error", description="A NaN/inf loss or gradient: stop and name the batch's rows (error), or drop that "
        "optimizer step, log it and count it (skip)."
    )
    max_nonfinite_skips: int = Field(
        10, ge=0, description="With on_nonfinite: skip, stop with an error once more steps than this were dropped."
    )
    loss_spike_factor: float = Field(
        5.0, ge=0, description="Warn when a step's loss exceeds this multiple of the median of the last 50 "
        "steps (after 10 steps); 0 turns the warning off."
    )
    optim: str = Field("adamw_torch", description=f"Optimizer: one of {', '.join(OPTIMIZERS)}.")
    lr_scheduler_type: str = Field("linear", description=f"One of {', '.join(SCHEDULERS)}.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a fraction of steps.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (wins over warmup_ratio).")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")

    # --- adapters and quantisation
    use_lora: bool = Field(True, description="Train LoRA adapters; false = full fine-tuning.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_target_modules: Union[str, list[str]] = Field(
        "all-linear", description='Modules to adapt: "all-linear" or a list like [q_proj, v_proj].'
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit (bitsandbytes, GPU).")
    use_8bit: bool = Field(False, description="Load the base in 8-bit (bitsandbytes, GPU).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the quantisation constants.")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the 4-bit matmuls."
    )

    # --- precision and speed
    bf16: Union[bool, Literal["auto"]] = Field(
        "auto", description="bfloat16 mixed precision. auto: on where the GPU has bf16 tensor cores (Ampere and "
        "newer); on a GPU without them fp16 with loss scaling (fp32 for model families that overflow in fp16); "
        "fp32 on the CPU. The choice is logged and stored in run.json."
    )
    fp16: bool = Field(False, description="float16 mixed precision with loss scaling (GPU).")
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="Recompute activations to save memory. auto: the least recomputation (none, a quarter, "
        "half or all of the layers) with which the run fits the GPU it has, the fastest by the estimate; off on CPU."
    )
    gradient_checkpointing_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the decoder layers checkpointed when gradient_checkpointing is on "
        "(evenly spread; the rest keep their activations): 0.5 saves about half of what full checkpointing saves "
        "for half of its recomputation. gradient_checkpointing: auto picks it too."
    )
    use_liger_kernel: bool = Field(False, description="Liger Triton kernels (GPU).")
    torch_compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="Compile each decoder layer with torch.compile (fused kernels; the first step takes "
        "about a minute longer while it compiles). auto: on for runs of at least 300 optimizer steps of LoRA or "
        "4-bit QLoRA in bf16 on one CUDA GPU, where it was measured 1.15-1.5x faster; off otherwise."
    )
    attn_implementation: Optional[str] = Field(
        None, description="Attention backend: sdpa, eager, flex_attention, flash_attention_2, or varlen "
        "(packed rows through PyTorch's variable-length flash kernel). Unset or auto: varlen when packing on a "
        "GPU and the model allows it, else the model's default."
    )
    packing: bool = Field(False, description="Pack examples padding-free into max_seq_length rows.")
    padding_free: Union[bool, Literal["auto"]] = Field(
        "auto", description="SFT without packing: the examples of a micro-batch sit end to end in one row "
        "instead of being padded to the longest (same batches, no padding; varlen attention on a GPU). "
        "auto: on where PyTorch's varlen kernel runs (a CUDA GPU, a model it supports) and NEFTune is off."
    )
    packing_strategy: Literal["bfd", "ffd", "wrapped"] = Field(
        "bfd", description="bfd/ffd: whole examples, best fit; wrapped: concatenate and cut (text)."
    )
    neftune_noise_alpha: Optional[float] = Field(
        None, gt=0, description="NEFTune: uniform noise on embeddings during training."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model repo.")
    allow_pickle_weights: bool = Field(
        False, description="Load base weights from pickle files (pytorch_model.bin) when there are no "
        "safetensors; unpickling can run code, so only for weights you trust."
    )

    # --- evaluation, checkpoints, logging
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to evaluate.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N optimizer steps.")
    save_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to checkpoint.")
    save_steps: int = Field(500, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: Optional[int] = Field(
        None, gt=0, description="Keep at most N checkpoints (never deleting the newest)."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after N evaluations without eval-loss improvement."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Minimum improvement that counts.")
    report_to: Union[str, list[str]] = Field(
        "none", description="Trackers: none, tensorboard, wandb (offline), mlflow (local store)."
    )
    run_name: Optional[str] = Field(None, description="Name shown in trackers.")

    # Which values auto-fit resolved from `auto` (lmpipeline/plan/autofit.py), for its GPU probe step.
    _auto: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            from lmpipeline.config.errors import did_you_mean

            raise ValueError(f"unknown optimizer `{v}`{did_you_mean(v, OPTIMIZERS)}; choose from {', '.join(OPTIMIZERS)}")
        return v

    @field_validator("per_device_train_batch_size", "micro_batch_tokens", mode="before")
    @classmethod
    def _positive_or_auto(cls, v, info):
        # One clear message instead of one per member of the Union.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        if info.field_name == "micro_batch_tokens":
            if v is None:
                return v
            raise ValueError(f"expected a positive number of tokens, `auto` or null, got {v!r}")
        raise ValueError(f"expected a positive integer or `auto`, got {v!r}")

    @field_validator("bf16", "gradient_checkpointing", "torch_compile", mode="before")
    @classmethod
    def _bool_or_auto(cls, v):
        if v == "auto" or isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off"):
            return v.lower() in ("true", "yes", "on")
        raise ValueError(f"expected true, false or `auto`, got {v!r}")

    @field_validator("micro_batch_tokens")
    @classmethod
    def _room_for_the_longest_row(cls, v, info):
        longest = info.data.get("max_seq_length")  # declared above, so already validated
        if isinstance(v, int) and longest and v < longest:
            raise ValueError(f"micro_batch_tokens {v} is below max_seq_length {longest}: a row of "
                             "max_seq_length tokens would not fit; raise it or use auto")
        return v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            from lmpipeline.config.errors import did_you_mean

            raise ValueError(f"unknown scheduler `{v}`{did_you_mean(v, SCHEDULERS)}")
        return v

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v):
        names = [v] if isinstance(v, str) else list(v)
        allowed = {"none", "tensorboard", "wandb", "mlflow"}
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"unknown tracker(s) {bad}; choose from {sorted(allowed)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.use_4bit and self.use_8bit:
            raise ValueError("use_4bit and use_8bit are exclusive: pick one")
        if (self.use_4bit or self.use_8bit) and not self.use_lora:
            raise ValueError("4-bit/8-bit loading trains adapters only: set use_lora: true")
        if self.bf16 is True and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive: pick one")
        b = self.per_device_train_batch_size
        if self.global_batch_size and b != "auto" and b * self.gradient_accumulation_steps != self.global_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} != per_device_train_batch_size x "
                             f"gradient_accumulation_steps ({b} x {self.gradient_accumulation_steps}); "
                             "global_batch_size is for per_device_train_batch_size: auto")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy: steps needs eval_steps")
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs evaluation: set eval_strategy and eval_steps")
        return self

    @property
    def trackers(self) -> list[str]:
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [n for n in names if n != "none"]


def token_budget(setting: int | str | None, micro_batch: int, max_seq_length: int, rows_per_item: int = 1) -> int | None:
    """The micro_batch_tokens budget in tokens (None: off). auto: the most a configured micro-batch can
    already hold (micro-batch x max_seq_length x rows per item), so regrouping never needs more memory
    than the configured setting's worst case."""
    if setting is None:
        return None
    if setting == "auto":
        return micro_batch * max_seq_length * rows_per_item
    return int(setting)


def padding_free_on(cfg, varlen_runs: bool) -> bool:
    """Whether a run lays a micro-batch's rows end to end: padding_free true, or auto where the varlen kernel
    runs (`varlen_runs`), packing is off (bins are end to end already) and NEFTune is off (its noise is
    scaled by the row's length, which one padding-free row of all the examples would change)."""
    if cfg.padding_free == "auto":
        return varlen_runs and not cfg.packing and not cfg.neftune_noise_alpha
    return bool(cfg.padding_free)


class SFTConfig(TrainStageConfig):
    """Supervised fine-tuning (stage `sft`, also selected by `trl_sft`)."""

    completion_only_loss: Optional[bool] = Field(
        None, description="Train only the completion of prompt/completion rows (auto: yes for them)."
    )
    assistant_only_loss: bool = Field(
        False, description="Train only assistant turns (content + end-of-turn token) of chat rows."
    )
    chunked_loss: bool = Field(
        True, description="Loss over trained positions only, LM head in chunks: no [tokens, vocab] logits "
        "(3B bf16 LoRA: 7.8 vs 11.7 GiB peak, 0.65x the tokens/s; bench/README.md). Ignored with Liger."
    )


class DPOConfig(TrainStageConfig):
    """Preference optimisation: DPO and its loss family."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the KL anchor.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = Field(
        "sigmoid", description="Preference loss (see lmpipeline/methods/losses.py for the papers)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO / cDPO smoothing.")
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO target reward margin gamma, as TRL CPO's (SimPO code: gamma_beta_ratio x beta)."
    )
    max_prompt_length: Optional[int] = Field(
        None, gt=0, description="Prompt tokens kept (left-truncated); rest of max_seq_length for replies."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once, cache them on disk, reuse them."
    )
    share_prompt: bool = Field(
        True, description="With varlen attention: one copy of the prompt per pair, read by both replies "
        "(fewer tokens, the same log-probs); false: the prompt once per sequence."
    )
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "none"] = Field(
        "auto", description="How the reference is formed (auto: disabled adapter for LoRA)."
    )
    from_previous_stage: Literal["merge", "stack"] = Field(
        "merge", description="After SFT: merge its adapter into the base (default) or stack a new one."
    )
    ultrafeedback_rejected: Literal["random", "worst"] = Field(
        "random", description="UltraFeedback raw binarisation: best vs a random other, or the worst."
    )


class PipelineConfig(_Strict):
    """A whole run: the model, where outputs go, and the stages in order."""

    model_name_or_path: Optional[str] = Field(None, description="Base model: local folder or Hub id.")
    tokenizer_name_or_path: Optional[str] = Field(None, description="Tokenizer, if not the model's.")
    output_dir: Optional[str] = Field(None, description="Run folder: run.json and one folder per stage.")
    stages: list[str] = Field(default_factory=list, description="Stages to run, in order.")
    stage_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-stage parameters, keyed by stage name."
    )
    preset: Optional[str] = Field(
        None, description="Model family preset (llama-3.2-3b, qwen2.5-7b, gemma-2-9b, ...; lmpipeline/config/presets): "
        "fills model id, precision, LoRA targets and its size class where you did not set them."
    )
    model_size: Optional[Literal["7b", "13b", "70b"]] = Field(
        None, description="Per-size defaults for every training stage: LoRA r/alpha 16/32, 32/64, "
        "64/128, dropout 0.05, batch 4x4, 2x8, 1x16, length 2048; SFT lr 2e-5, 3 epochs. Your keys win."
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype to load weights in (auto: bf16 when training in bf16, else fp32)."
    )

    # Where the config came from, for error messages raised after validation (see key_location).
    _source_file: Optional[str] = PrivateAttr(None)
    _key_lines: dict[str, int] = PrivateAttr(default_factory=dict)
    # Values lmpipeline chose for the user (printed, and stored in run.json under "derived").
    _derived: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def stage_kinds(self) -> dict[str, str]:
        return {name: STAGE_ALIASES[name] for name in self.stages if name in STAGE_ALIASES}

    def stage(self, name: str):
        """The typed config of stage `name` (validated by `load_config`)."""
        kind = STAGE_ALIASES[name]
        values = dict(self.stage_configs.get(name, {}))
        if kind not in TRAINING_KINDS and "allow_pickle_weights" not in values:
            # Evaluation and merging load the base the training stages loaded: a pickle base a training
            # stage was allowed to read is allowed here too, unless this stage says otherwise.
            values["allow_pickle_weights"] = any(
                bool(self.stage_configs.get(s, {}).get("allow_pickle_weights"))
                for s in self.stages if STAGE_ALIASES.get(s) in TRAINING_KINDS)
        return STAGE_CONFIG_CLASSES[kind](stage_name=name, **values)


# Evaluation, merging and packaging stages keep their configs in their own module.
from lmpipeline.config.lifecycle import LIFECYCLE_CONFIG_CLASSES  # noqa: E402

for _kind, _cls in LIFECYCLE_CONFIG_CLASSES.items():
    register_stage_kind(_kind, (_kind,), _cls, trains=False)
