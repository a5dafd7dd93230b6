"""Load a tokenizer and a causal LM the way a stage config asks: dtype, 4/8-bit, attention backend.

Supports local folders and Hub ids (the Hub only when online). Weights load through safetensors only:
pickle weights (pytorch_model.bin) need `allow_pickle_weights: true`, because unpickling can run code.
`trust_remote_code` stays off unless the config sets it. Raises UserError for anything a user can fix:
a missing folder, a Hub id that cannot be reached offline, QLoRA without a GPU, bitsandbytes missing.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.errors import UserError
from lmpipeline.models import attention

log = logging.getLogger(__name__)

# transformers' v6 renamings (gradient_checkpointing_* -> activation_checkpointing_*), warned on every load
# and adapter set-up, mostly from peft's own calls: nothing a user of lmpipeline can act on.
RENAMING_WARNINGS = r"`\w+` is deprecated and will be removed in v6"
# transformers' bars over a checkpoint's tensors as it is read from disk and over its shards as it is
# saved: a bar per model load or save, between the log lines (which say when a model is written).
# Download bars (a Hub model fetched for the first time) stay: those take minutes.
QUIET_BARS = ("Loading weights", "Writing model shards")


def hide_loading_noise() -> None:
    """Silence what every model load and save prints that is not the user's business (the constants above)."""
    warnings.filterwarnings("ignore", message=RENAMING_WARNINGS, category=FutureWarning)
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5 draws the loading bar through it
    if set_hook is not None:
        set_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs)
                 if kwargs.get("desc") in QUIET_BARS else factory(*args, **kwargs))


hide_loading_noise()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_reference(name: str | None, key: str = "model_name_or_path") -> None:
    """Fail early, before any heavy work, when a local model folder does not exist."""
    if not name:
        raise UserError("no model given", key=key, hint=f"set it in the config or with --set {key}=PATH_OR_HUB_ID")
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"`{name}` is a file; a model folder (holding config.json) or a Hub id is needed", key=key)
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise UserError(f"`{name}` is a folder but holds no config.json (not a saved model)", key=key)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder `{name}` does not exist", key=key)


def load_tokenizer(name: str, *, eos_token: str | None = None, pad_token: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from `{name}`: {str(e).splitlines()[0]}", key="model_name_or_path") from None
    if eos_token:
        tok.eos_token = eos_token
    if pad_token:
        tok.pad_token = pad_token
    if tok.pad_token is None:
        # Padding is masked by position (attention_mask/labels), never by id, so reusing EOS as pad
        # cannot hide the real EOS from the loss in this project's collators.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: padding with EOS (%s); pads are masked by position", tok.eos_token)
    return tok


def training_dtype(stage: TrainStageConfig, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if stage.bf16 is True:
        return torch.bfloat16
    if stage.fp16:
        return torch.float16
    return torch.float32


def quantization_config(stage: TrainStageConfig):
    if not (stage.use_4bit or stage.use_8bit):
        return None
    key = "use_4bit" if stage.use_4bit else "use_8bit"
    if not torch.cuda.is_available():
        raise UserError(
            "4-bit/8-bit loading (bitsandbytes) needs a CUDA GPU and none is visible",
            key=f"stage_configs.{stage.stage_name}.{key}",
            hint="run on a GPU machine, or set it to false for bf16/fp32 LoRA on this machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("bitsandbytes is not installed", key=key, hint="pip install 'lmpipeline[gpu]'") from None
    from transformers import BitsAndBytesConfig

    if stage.use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=stage.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=stage.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=DTYPES[stage.bnb_4bit_compute_dtype],
        # Storage dtype = compute dtype lets FSDP shard 4-bit weights alongside bf16 ones.
        bnb_4bit_quant_storage=DTYPES[stage.bnb_4bit_compute_dtype],
    )


def load_model(name: str, stage: TrainStageConfig, *, torch_dtype: str = "auto", auto_class=None, **model_kwargs):
    """The base model for a training stage, on the right device, quantised if asked. `auto_class` (default
    AutoModelForCausalLM) and `model_kwargs` (e.g. num_labels) let a method load another head on the base."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    check_model_reference(name)
    weights_policy = pickle_policy(name, allowed=stage.allow_pickle_weights,
                                   key=f"stage_configs.{stage.stage_name}.allow_pickle_weights" if stage.stage_name
                                   else "allow_pickle_weights")
    quant = quantization_config(stage)
    kwargs = dict(
        dtype=DTYPES[stage.bnb_4bit_compute_dtype] if quant is not None else training_dtype(stage, torch_dtype),
        trust_remote_code=stage.trust_remote_code,
        **weights_policy,
    )
    if stage.attn_implementation and stage.attn_implementation not in ("auto", *attention.VARLEN_NAMES):
        # auto/varlen are chosen after loading (models/attention.py): the model loads with its default.
        kwargs["attn_implementation"] = stage.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = auto_class.from_pretrained(name, **kwargs, **model_kwargs)
    except (OSError, ValueError, pickle.UnpicklingError, SafetensorError) as e:  # pickle: what weights_only refuses
        raise UserError(f"cannot load model `{name}`: {str(e).splitlines()[0]}", key="model_name_or_path",
                        hint="the weight files are damaged or incomplete: copy or download the model again") from None
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        # config.json and the weights disagree (e.g. hidden_size edited, or weights of another model).
        raise UserError(f"cannot load model `{name}`: its weights do not match its config.json (shapes differ)",
                        key="model_name_or_path", hint="use the config.json that came with these weights") from None
    if quant is None and torch.cuda.is_available():
        model.to(torch.cuda.current_device())
    return model


def pickle_policy(name: str, *, allowed: bool, key: str) -> dict:
    """The from_pretrained keyword for loading `name` under the pickle policy that training, evaluation,
    merging and chat share. Raises a UserError naming `key` when `name` is a local model folder whose
    weights are pickle files only (.bin/.pt: unpickling can run code) and `allowed` is false."""
    # True: transformers refuses pickle files; None: safetensors first, pickle if that is all there is.
    policy = {"use_safetensors": None if allowed else True}
    p = Path(name).expanduser()
    if allowed or not p.is_dir() or (p / "adapter_config.json").exists():
        return policy
    pickles = [f for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth") and f.name != "training_args.bin"]
    if pickles and not any(p.glob("*.safetensors")):
        raise UserError(
            f"`{name}` holds pickle weights only (.bin/.pt), no .safetensors; loading a pickle can run code",
            key=key,
            hint="convert them to safetensors (save_pretrained(..., safe_serialization=True)), or set "
                 "allow_pickle_weights: true (--allow-pickle-weights) if you trust where the file came from",
        )
    return policy


def apply_lora(model, stage: TrainStageConfig, *, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a fresh LoRA adapter (QLoRA when the base is quantised). `task_type` "SEQ_CLS"
    (a reward model) also trains and saves the classification head (peft's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        prepare_kbit_model(model, stage)
    targets = stage.lora_target_modules
    config = LoraConfig(
        r=stage.lora_r,
        lora_alpha=stage.lora_alpha,
        lora_dropout=stage.lora_dropout,
        target_modules=targets,
        use_dora=stage.use_dora,
        use_rslora=stage.use_rslora,
        task_type=task_type,
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(
            f"LoRA could not be applied: {str(e).splitlines()[0]}",
            key=f"stage_configs.{stage.stage_name}.lora_target_modules",
            hint='use "all-linear" or module names of this architecture (e.g. q_proj, v_proj)',
        ) from None


def prepare_kbit_model(model, stage: TrainStageConfig) -> None:
    """What peft's prepare_model_for_kbit_training does for a 4-/8-bit base, less its float32 upcast of
    every non-quantised weight: freeze the base, and checkpoint as configured.

    The upcast (embeddings, norms, LM head: frozen, so it buys nothing under bf16 autocast, and our
    loading cast them back afterwards) set the QLoRA peak: while it ran, the fp32 copies and the bf16
    tensor being converted were alive together. The measured peaks matched that moment to 0.01 GiB,
    3.56 GiB for random Llama-3.2-3B and 8.25 for Llama-3.1-8B (H200, bench/README.md),
    against 3.49 and 7.10 estimated for training itself.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if stage.gradient_checkpointing:
        enable_gradient_checkpointing(model, stage.gradient_checkpointing_fraction)


def checkpointed_layer_indices(n_layers: int, fraction: float) -> list[int]:
    """Which of `n_layers` decoder layers to checkpoint for `fraction` of them: ceil(n x fraction) layers
    spread evenly (which ones does not change the peak, which comes when all layers' activations are
    held at the start of the backward; spreading them keeps the recompute evenly paced)."""
    k = min(n_layers, max(1, math.ceil(n_layers * fraction - 1e-9)))
    return sorted({int(i * n_layers / k) for i in range(k)})


def enable_gradient_checkpointing(model, fraction: float = 1.0) -> int:
    """Checkpoint `fraction` of the decoder layers (all by default); returns how many are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # Non-reentrant checkpointing works with frozen inputs (LoRA) without the input-grad hack.
    # transformers 5.24 renamed the method (the old name warns until v6); the GPU image's 5.17 has only the old.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = set(checkpointed_layer_indices(len(layers), fraction)) if layers else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen  # transformers checks this flag per layer, per call
    if layers and len(chosen) < len(layers):
        log.info("gradient checkpointing: %d of %d decoder layers (fraction %g)", len(chosen), len(layers), fraction)
    return len(chosen)


def apply_liger(model, *, loss_only: bool = False) -> None:
    """Liger's Triton kernels on `model` in place. loss_only: just its fused linear cross-entropy, for
    torch_compile runs (Inductor fuses norms, SwiGLU and RoPE itself, and cannot trace Liger's
    autograd functions inside a compiled layer)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("use_liger_kernel needs liger-kernel", key="use_liger_kernel", hint="pip install 'lmpipeline[gpu]'") from None
    if not torch.cuda.is_available():
        raise UserError("Liger kernels are Triton GPU kernels and no CUDA GPU is visible", key="use_liger_kernel")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if loss_only:
        _apply_liger_kernel_to_instance(model=base, rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    else:
        _apply_liger_kernel_to_instance(model=base)
