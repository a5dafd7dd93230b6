"""Merge LoRA adapters into their base and save a standalone model, for deployment.

    load the base unquantised in the target dtype
      -> for each adapter of the chain, in order (SFT, then DPO, ...):
             PeftModel.from_pretrained + merge_and_unload(safe_merge)
      -> save safetensors shards (max_shard_size), the tokenizer (with its chat template),
         generation_config, and merge_info.json (what was merged, how, warnings)

The chain comes from lmpipeline.evaluate.generation.resolve_model: a DPO adapter trained after a LoRA
SFT stage is merged after the SFT adapter, as it was trained on top of it.

Quantised training. An adapter trained on a 4-bit base (QLoRA) learned corrections for the 4-bit
weights; merging it into the original full-precision weights (the default, and the only way to get
an unquantised model) gives outputs slightly different from the QLoRA model that was evaluated (peft
issue #2321 on merging into 4-bit layers; #2105 on the choice of base). The merge says so in the log
and in merge_info.json. `quantized_base="dequantized"` merges into the 4-bit round trip of the base
instead (what training saw), which needs a GPU and bitsandbytes. A base checkpoint that is itself
stored quantised (quantization_config in its config.json) is dequantised first (GPU) or refused.

generation_config: the base's, plus the chat template's end-of-turn token as an extra eos when it is
a single token the base does not stop on (so `generate` stops at the end of an answer); this derived
change is logged and recorded in merge_info.json.

Raises UserError: nothing to merge (a full model), an existing non-empty output folder without
overwrite, a quantised base on a machine without CUDA, NaN/inf after merging (safe_merge).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline import outputs
from lmpipeline.config.lifecycle import MergeConfig
from lmpipeline.context import RUN_FILE, RunContext, StageResult
from lmpipeline.data.cache import file_sha256
from lmpipeline.errors import UserError
from lmpipeline.evaluate import generation as gen
from lmpipeline.methods import makes_causal_lm, method_for

log = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"
QLORA_WARNING = (
    "adapter(s) {names} were trained on a 4-bit quantised base; merged into the unquantised base weights "
    "the model differs slightly from the QLoRA model that was trained and evaluated (rounding of the 4-bit "
    "weights; peft issues #2321, #2105). Evaluate the merged model before shipping it, or merge with "
    "quantized_base: dequantized on a GPU to reproduce the trained model"
)


@dataclass
class MergeResult:
    output_dir: Path
    spec: gen.ModelSpec
    dtype: str
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _base_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of base model `{name}`: {str(e).splitlines()[0]}",
                        hint="if it is a Hub id and this machine is offline, pass --base-model LOCAL_FOLDER") from None


def target_dtype(dtype: str, base_config) -> str:
    """The dtype name to merge in: as asked, or the base checkpoint's own (float32 when unknown)."""
    if dtype != "auto":
        return dtype
    own = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    name = str(own).removeprefix("torch.") if own is not None else ""
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def _load_dequantized(base: str, torch_dtype, bnb: dict | None, trust_remote_code: bool, allow_pickle_weights: bool):
    """A base loaded in 4-bit then dequantised: the weights a QLoRA adapter was trained against."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise UserError("dequantising a 4-bit base needs a CUDA GPU (bitsandbytes) and none is visible",
                        key="quantized_base", hint="use quantized_base: original on this machine, or run on a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("bitsandbytes is not installed", key="quantized_base",
                        hint="pip install 'lmpipeline[gpu]'") from None
    from lmpipeline.models.loading import pickle_policy

    kwargs = {"dtype": torch_dtype, "device_map": {"": torch.cuda.current_device()}, "trust_remote_code": trust_remote_code,
              **pickle_policy(base, allowed=allow_pickle_weights, key="allow_pickle_weights")}
    if bnb is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model = model.dequantize()
    return model.to(torch_dtype)


def _training_bnb(run_stage_config: dict) -> dict:
    import torch

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        run_stage_config.get("bnb_4bit_compute_dtype", "bfloat16")]
    return {"load_in_4bit": True, "bnb_4bit_quant_type": run_stage_config.get("bnb_4bit_quant_type", "nf4"),
            "bnb_4bit_use_double_quant": run_stage_config.get("bnb_4bit_use_double_quant", True),
            "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": compute}


def _file_sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def merge_model(spec: gen.ModelSpec, output_dir: str | Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
                safe_merge: bool = True, quantized_base: str = "original", training_quant: dict | None = None,
                device: str = "cpu", trust_remote_code: bool = False, overwrite: bool = False,
                allow_pickle_weights: bool = False) -> MergeResult:
    """Merge `spec.adapters` into `spec.base` and save the result in `output_dir` (see module docstring).

    `output_dir` may not overlap the base, the tokenizer or an adapter (a folder beside them in a run folder
    is fine), and replaces only an earlier merge output (lmpipeline/outputs.py).

    `training_quant` is the 4-bit setting adapters were trained with (run.json stage config keys
    bnb_4bit_*), used only with quantized_base="dequantized".
    """
    import torch
    from peft import PeftModel

    out = Path(output_dir)
    if not spec.adapters:
        raise UserError(f"nothing to merge: `{spec.base}` is a full model, not a LoRA adapter",
                        hint="merge applies to runs trained with use_lora: true")
    outputs.check_is_folder(out, key="--output")
    inputs = {**{f"adapter {a}": a for a in spec.adapters}, "base model": spec.base, "tokenizer": spec.tokenizer}
    outputs.check_disjoint(out, inputs, output_key="--output")
    outputs.check_replaceable(out, "merge", key="--output", overwrite=overwrite)
    warnings: list[str] = []
    config = _base_config(spec.base, trust_remote_code)
    dtype_name = target_dtype(dtype, config)
    torch_dtype = getattr(torch, dtype_name)

    stored_quant = getattr(config, "quantization_config", None)
    if stored_quant is not None:
        log.info("base %s is stored quantised: dequantising it to %s before merging", spec.base, dtype_name)
        model = _load_dequantized(spec.base, torch_dtype, None, trust_remote_code, allow_pickle_weights)
        warnings.append(f"the base checkpoint is stored quantised; it was dequantised to {dtype_name} before merging")
    elif quantized_base == "dequantized" and spec.quantized_training:
        model = _load_dequantized(spec.base, torch_dtype, _training_bnb(training_quant or {}), trust_remote_code,
                                  allow_pickle_weights)
    else:
        model = gen.load_base(spec.base, torch_dtype, trust_remote_code=trust_remote_code,
                              device_map={"": device} if device != "cpu" else None,
                              allow_pickle_weights=allow_pickle_weights)
        if spec.quantized_training:
            warnings.append(QLORA_WARNING.format(names=", ".join(spec.stage_names)))
    for w in warnings:
        log.warning("merge: %s", w)

    for adapter in spec.adapters:
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
            model = model.merge_and_unload(safe_merge=safe_merge)
        except ValueError as e:
            raise UserError(f"merging {adapter} failed: {str(e).splitlines()[0]}",
                            hint="NaN/inf in the merged weights means the adapter is broken; check its training") from None
        log.info("merged adapter %s", adapter)
    model.to("cpu")

    tmp = outputs.unique_temp(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = _save_merged(model, spec, tmp, torch_dtype=torch_dtype, dtype_name=dtype_name, max_shard_size=max_shard_size,
                            safe_merge=safe_merge, quantized_base=quantized_base, warnings=warnings,
                            trust_remote_code=trust_remote_code)
        outputs.mark(tmp, "merge")
        outputs.put_in_place(tmp, out)
    finally:
        if tmp.exists():  # stopped or failed half-way: the temporary folder is ours, the output untouched
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model written to %s (%s)", out, dtype_name)
    return MergeResult(out, spec, dtype_name, warnings, info)


def _save_merged(model, spec: gen.ModelSpec, folder: Path, *, torch_dtype, dtype_name: str, max_shard_size: str,
                 safe_merge: bool, quantized_base: str, warnings: list[str], trust_remote_code: bool) -> dict:
    """Weights, tokenizer, generation config and merge_info.json of the merged model, into `folder`."""
    folder.mkdir(parents=True)
    model.config.dtype = torch_dtype
    tokenizer = _tokenizer(spec, trust_remote_code)
    derived = _generation_config(model, tokenizer)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": spec.base,
        "adapters": [{"path": str(a), "stage": n, "sha256": _file_sha256(Path(a) / "adapter_model.safetensors")}
                     for a, n in zip(spec.adapters, spec.stage_names[-len(spec.adapters):])],
        "stages": spec.stage_names,
        "dtype": dtype_name,
        "max_shard_size": max_shard_size,
        "safe_merge": safe_merge,
        "quantized_training": spec.quantized_training,
        "quantized_base": quantized_base,
        "derived": derived,
        "warnings": warnings,
    }
    (folder / MERGE_INFO).write_text(json.dumps(info, indent=2))
    return info


def _tokenizer(spec: gen.ModelSpec, trust_remote_code: bool):
    # Loaded as trained (no pad-token defaults added): the tokenizer ships with the weights.
    from transformers import AutoTokenizer

    if not spec.tokenizer:
        return None
    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {spec.tokenizer}: {str(e).splitlines()[0]}") from None


def _generation_config(model, tok) -> dict:
    """Add the chat template's end-of-turn token to generation_config's eos ids (recorded, logged)."""
    if tok is None:
        return {}
    template = gen.resolve_template(tok)
    stops = gen.stop_token_ids(tok, template)
    gc = model.generation_config
    eos = gc.eos_token_id
    current = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    missing = [t for t in stops if t not in current]
    if not missing:
        return {}
    gc.eos_token_id = current + missing
    log.info("generation_config.eos_token_id: %s -> %s (the chat template ends turns with token %s)",
             current, gc.eos_token_id, missing)
    return {"generation_config.eos_token_id": {"from": current, "to": gc.eos_token_id}}


def check_causal(ctx: RunContext, stage_names, merge_name: str) -> None:
    """Merging writes a causal LM: refuse an adapter whose method trained another head (a reward model's
    score), which the merged folder would silently lose."""
    kinds = {out.name: out.kind for out in ctx.completed}
    for stage in stage_names:
        if not makes_causal_lm(kinds.get(stage, "")):
            method = method_for(kinds[stage])
            raise UserError(f"stage `{stage}` trained a {method.title or method.name}, a {method.model_class}; "
                            "merge writes a causal LM and would drop its head", key=f"stages ({merge_name})",
                            hint=f"leave {merge_name} out after it: {stage}/final loads as its model card "
                                 "(README.md) shows")


class MergeStage:
    """`MergeStage(MergeConfig).execute(ctx)` -> StageResult with the merged model in <stage>/final."""

    def __init__(self, config: MergeConfig):
        if not isinstance(config, MergeConfig):
            raise TypeError(f"MergeStage needs a MergeConfig, got {type(config).__name__}")
        self.config = config

    def execute(self, ctx: RunContext) -> StageResult:
        cfg = self.config
        name = cfg.stage_name or "merge"
        out = Path(cfg.output_dir) if cfg.output_dir else Path(ctx.run_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        spec = gen.spec_for_context(ctx, cfg.stage, cfg.base_model)
        if not spec.adapters:
            log.info("[%s] the latest model (%s) has full weights: nothing to merge", name, spec.base)
            return StageResult(name, out, Path(spec.base), adapter=False,
                               notes={"skipped": "the latest model has full weights; nothing to merge"})
        check_causal(ctx, spec.stage_names, name)
        quant = {}
        if (Path(ctx.run_dir) / RUN_FILE).is_file():
            run = gen.read_run(ctx.run_dir)
            quant = next((run.stage_config(s) for s in spec.stage_names if run.stage_config(s).get("use_4bit")), {})
        result = merge_model(spec, out / "final", dtype=cfg.dtype, max_shard_size=cfg.max_shard_size,
                             safe_merge=cfg.safe_merge, quantized_base=cfg.quantized_base, training_quant=quant,
                             device=cfg.device, trust_remote_code=cfg.trust_remote_code, overwrite=True,
                             allow_pickle_weights=cfg.allow_pickle_weights)
        return StageResult(name, out, result.output_dir, adapter=False,
                           notes={"base_model": spec.base, "merged_stages": spec.stage_names, "dtype": result.dtype,
                                  "warnings": result.warnings})


__all__ = ["merge_model", "MergeStage", "MergeResult", "target_dtype", "MERGE_INFO"]
