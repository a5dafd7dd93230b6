"""Adapter chains: an adapter trained on top of earlier adapters, and the file that says so.

A preference stage after a LoRA SFT stage trains its adapter over the SFT model (the SFT adapter merged
into the base, or stacked under the new one). Its final folder then holds CHAIN_FILE, naming the base
and every adapter to apply, in order; LoRA deltas on the same weights add, so applying them in order
(each merged before the next is loaded) gives the trained model. Entries name their folders relative to
the chain file first (a moved or copied run folder stays whole), their absolute path second.

Training (methods/dpo.py) writes the file; evaluation, generation, merge and package read it here.
"""

from __future__ import annotations

import json
from pathlib import Path

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
