"""Adapter chains: an adapter trained on top of earlier adapters, and the file that says so.

A preference stage after a LoRA SFT stage trains its adapter over the SFT model (the SFT adapter merged
into the base, or stacked under the new one). Its final folder then holds CHAIN_FILE, naming the base
and every adapter to apply, in order; LoRA deltas on the same weights add, so applying them in order
(each merged before the next is loaded) gives the trained model. Entries name their folders relative to
the chain file first (a moved or copied run folder stays whole), their absolute path second.

Training (methods/start.py) writes the file; evaluation, generation, merge and package read it here.

`combine_lora`: LoRA deltas on the same base add, so a chain of adapters is also one adapter whose rank
is the sum of theirs: each module's A matrices stacked, its B matrices side by side, each B times its
adapter's scale (alpha / r, or alpha / sqrt(r) for rsLoRA), and the new scale 1. That adapter, loaded
with plain PEFT on the base, gives the chain's model exactly (in float weights; on a 4-bit base the
chain merged the earlier adapters into re-quantised weights, which it does not).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmpipeline.errors import UserError

CHAIN_FILE = "lmpipeline_chain.json"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder: Path) -> bool:
    return (Path(folder).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder's adapter_config.json names (None when it names none)."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_chain(folder: Path) -> tuple[str | None, list[Path], list[str | None]] | None:
    """(base model, adapters in the order they apply, the stage that trained each) from `folder`'s chain
    file; None when the folder has none. Raises UserError for an unreadable file or a missing adapter."""
    path = Path(folder) / CHAIN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        entries = list(data["adapters"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    paths, names = [], []
    for entry in entries:
        relative = (Path(folder) / entry.get("path", ".")).resolve()
        absolute = Path(entry["abs_path"]) if entry.get("abs_path") else None
        found = relative if is_adapter(relative) else absolute if absolute is not None and is_adapter(absolute) else None
        if found is None:
            raise UserError(f"{path} lists adapter `{entry.get('path')}` (stage {entry.get('stage')}), which is not "
                            "on this machine", hint="keep the run folder together, or package it with `lmpipeline package`")
        paths.append(found)
        names.append(entry.get("stage"))
    return data.get("base_model"), paths, names


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def chain_includes(folder: Path) -> list[str]:
    """The earlier stages whose adapters a combined adapter folder holds (its chain file's "includes")."""
    path = Path(folder) / CHAIN_FILE
    if not path.is_file():
        return []
    try:
        return [e.get("stage") for e in json.loads(path.read_text()).get("includes", [])]
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def combinable(folders: list[Path]) -> str | None:
    """Why these adapters cannot be summed into one plain LoRA adapter, or None when they can."""
    for folder in folders:
        cfg = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            return f"{folder} is a {cfg.get('peft_type')} adapter, not LoRA"
        if cfg.get("use_dora"):
            return f"{folder} is a DoRA adapter (its magnitude vectors do not add)"
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            return f"{folder} sets a per-module rank or alpha"
        if cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
            return f"{folder} trains whole modules or biases beside its LoRA matrices"
        if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
            return f"{folder} has no {ADAPTER_WEIGHTS}"
    return None


def _scale(cfg: dict) -> float:
    r = cfg["r"]
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


def combine_lora(folders: list[Path], out: Path) -> None:
    """Write into `out` (adapter_config.json, adapter_model.safetensors) one LoRA adapter equal to
    `folders` applied in order (module docstring). Check `combinable` first."""
    configs = [json.loads((Path(f) / ADAPTER_CONFIG).read_text()) for f in folders]
    tensors = [load_file(str(Path(f) / ADAPTER_WEIGHTS)) for f in folders]
    modules = sorted({k[:-len(".lora_A.weight")] for t in tensors for k in t if k.endswith(".lora_A.weight")})
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        shape_from = next(t for t in tensors if a_key in t)
        d_in, d_out = shape_from[a_key].shape[1], shape_from[b_key].shape[0]
        dtype = shape_from[a_key].dtype
        a_parts, b_parts = [], []
        for cfg, t in zip(configs, tensors):
            if a_key in t:
                a_parts.append(t[a_key].float())
                b_parts.append(t[b_key].float() * _scale(cfg))
            else:  # this adapter left the module alone: zero rows keep the ranks aligned
                a_parts.append(torch.zeros(cfg["r"], d_in))
                b_parts.append(torch.zeros(d_out, cfg["r"]))
        merged[a_key] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
        merged[b_key] = torch.cat(b_parts, dim=1).to(dtype).contiguous()
    rank = sum(c["r"] for c in configs)
    config = dict(configs[-1])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0,
                  target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
