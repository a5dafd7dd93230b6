"""Reference log-probs computed once (`precompute_ref_log_probs: true`) and cached on disk.

A DPO reference model is frozen, so its per-pair log-probs (summed over completion tokens) never
change during training. Computing them once before training frees the reference forward from every
step (about a third of DPO's compute, and the frozen copy's memory for full fine-tuning); caching
them means a second run on the same model and data, or a resumed run, skips even that pass.

Location: $LMPIPELINE_CACHE_DIR/ref_logps, else ~/.cache/lmpipeline/ref_logps; one <key>.npz per
entry holding `train` [pairs, 2] and optionally `eval` [pairs, 2] (chosen, rejected) in pair order,
plus JSON metadata. Written atomically; an unreadable entry is ignored (recomputed) with a warning.

Key = sha256 of
    reference: the reference model's weights. For a model loaded from a folder: the names, sizes and
               mtimes of its weight and config files; for a Hub id: the id and the cached snapshot
               commit; for an in-memory model: a hash of its state_dict. Plus the sha256 of every
               adapter merged into it (the SFT adapter chain), and the load settings that change the
               numbers (dtype, 4/8-bit quantisation, attention backend, autocast precision).
    data:      sha256 of the tokenised pairs (train and eval, in order), which already covers the
               data files, tokenizer, chat template and max lengths; those are added too so that the
               metadata says what the entry was computed from.
    version:   REF_CACHE_VERSION (bumped when the computation changes).
Any change gives a new key, so a stale entry is never read.

Assumption: file mtimes change when weights are rewritten in place (true of save_pretrained).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmpipeline.data.cache import file_sha256

log = logging.getLogger(__name__)

REF_CACHE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")


def ref_cache_dir() -> Path:
    root = os.environ.get("LMPIPELINE_CACHE_DIR")
    return Path(root) / "ref_logps" if root else Path.home() / ".cache" / "lmpipeline" / "ref_logps"


def weights_fingerprint(name_or_path: str) -> dict:
    """Cheap identity of a model's weights: file names, sizes and mtimes (no hashing of gigabytes)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and (
            q.suffix in _WEIGHT_SUFFIXES or q.name in _CONFIG_FILES or q.name.endswith(".index.json")))
        return {"path": str(p.resolve()),
                "files": [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]}
    snapshot = None
    try:  # the exact revision this machine would load, when the Hub cache holds it
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):
            snapshot = Path(cached).parent.name
    except Exception:  # noqa: BLE001 - any failure just means "unknown revision"
        snapshot = None
    return {"hub": name_or_path, "snapshot": snapshot}


def adapter_fingerprint(folder: str | Path) -> str:
    """sha256 over an adapter folder's weights and config (adapters are small: hash the bytes)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for q in sorted(folder.iterdir()):
        if q.is_file() and (q.name.startswith("adapter_model") or q.name == "adapter_config.json"):
            h.update(q.name.encode())
            h.update(file_sha256(q).encode())
    return h.hexdigest()


def module_fingerprint(model, skip: str | None = None) -> str:
    """sha256 of a module's state_dict (for a model handed over in memory, with no files to name).
    Entries whose name contains `skip` are left out (the fresh, not-yet-trained DPO adapter)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if skip and skip in name:
            continue
        t = t.detach().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        try:
            data = t.contiguous().numpy()
        except TypeError:  # bfloat16, float8: no numpy dtype; float32 holds them exactly
            data = t.to(torch.float32).contiguous().numpy()
        h.update(data.tobytes())
    return h.hexdigest()


def reference_fingerprint(*, base: str | None = None, adapters: list[str | Path] = (), model=None,
                          settings: dict | None = None, skip: str | None = None) -> dict:
    """What the reference model is. Give `base` (+ `adapters` merged into it in order) when it was
    loaded from files, or `model` when it exists only in memory."""
    ref: dict = {"settings": settings or {}}
    if base is not None:
        ref["base"] = weights_fingerprint(base)
    if model is not None:
        ref["state_dict"] = module_fingerprint(model, skip)
    ref["adapters"] = [adapter_fingerprint(a) for a in adapters]
    return ref


def cache_key(reference: dict, data: dict) -> str:
    blob = json.dumps({"version": REF_CACHE_VERSION, "reference": reference, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class RefLogps:
    """Reference log-probs [pairs, 2] (chosen, rejected), in pair order."""

    train: np.ndarray
    eval: np.ndarray | None = None


def load(key: str) -> RefLogps | None:
    path = ref_cache_dir() / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            train = arrays["train"].astype(np.float64)
            ev = arrays["eval"].astype(np.float64) if "eval" in arrays.files else None
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable reference log-prob cache %s: %s", path, e)
        return None
    return RefLogps(train, ev)


def save(key: str, ref: RefLogps, meta: dict | None = None) -> Path | None:
    folder = ref_cache_dir()
    path = folder / f"{key}.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"train": np.asarray(ref.train, dtype=np.float64)}
        if ref.eval is not None:
            arrays["eval"] = np.asarray(ref.eval, dtype=np.float64)
        blob = json.dumps(meta or {}, default=str).encode()
        tmp = folder / f"{key}.tmp.{socket.gethostname()}.{os.getpid()}.npz"  # per process: ranks write at once
        np.savez(tmp, meta=np.frombuffer(blob, dtype=np.uint8), **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full disk must not stop training
        log.warning("could not write the reference log-prob cache in %s: %s", folder, e)
        return None
    return path


__all__ = ["RefLogps", "ref_cache_dir", "reference_fingerprint", "weights_fingerprint", "adapter_fingerprint",
           "module_fingerprint", "cache_key", "load", "save", "REF_CACHE_VERSION"]
