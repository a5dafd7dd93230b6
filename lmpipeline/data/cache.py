"""On-disk cache of tokenised datasets, keyed by everything that changes the tokens.

Key = data file contents (sha256) or Hub name/split + tokenizer vocabulary + chat template + every
option that changes tokens (format, masking mode, max length, over-long policy, split, seed...) +
the cache format version. Any change gives a new key, so a stale entry is never read; the same
config in a later run or stage reads the entry instead of tokenising again.

Location: $LMPIPELINE_CACHE_DIR, else ~/.cache/lmpipeline/tokenized. Entries are .npz files
(token arrays + JSON metadata) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np

from lmpipeline.data.types import Source, TokenizedExample

log = logging.getLogger(__name__)

# 2: per-turn loss_weight is honoured under loss_on "all" too; entries made before trained those turns.
CACHE_VERSION = 2
TOKEN_OPTIONS = (
    "dataset_format", "dataset_split", "dataset_text_field", "column_mapping", "eval_dataset_name_or_path",
    "validation_split_ratio", "max_samples", "max_seq_length", "on_invalid", "on_overlong", "chat_template_path",
    "chat_template", "eos_token", "pad_token", "seed", "assistant_only_loss", "completion_only_loss",
    "max_prompt_length", "ultrafeedback_rejected", "packing", "packing_strategy",
)


def cache_dir() -> Path:
    return Path(os.environ.get("LMPIPELINE_CACHE_DIR") or Path.home() / ".cache" / "lmpipeline" / "tokenized")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(spec: str) -> str:
    """Content hash of a local file or folder; for a Hub name, the name itself (with its split)."""
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()
    return f"hub:{spec}"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, str(tokenizer.chat_template)]).encode())
    return h.hexdigest()


def fingerprint_inputs(cfg, tokenizer) -> dict:
    src = cfg.dataset_name_or_path
    specs = [src] if isinstance(src, str) else [s.model_dump() for s in (src or [])]
    data = [source_fingerprint(s if isinstance(s, str) else s["path"]) for s in specs]
    if cfg.eval_dataset_name_or_path:
        data.append(source_fingerprint(cfg.eval_dataset_name_or_path))
    template_file = source_fingerprint(cfg.chat_template_path) if cfg.chat_template_path else None
    options = {k: getattr(cfg, k) for k in TOKEN_OPTIONS if hasattr(cfg, k)}
    return {
        "version": CACHE_VERSION,
        "kind": type(cfg).__name__,
        "sources": specs,
        "data": data,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template_file": template_file,
        "options": options,
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _pack(examples: list[TokenizedExample], prefix: str) -> dict:
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    return {
        f"{prefix}_ids": np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in examples]) if examples else np.zeros(0, np.int64),
        f"{prefix}_labels": np.concatenate([np.asarray(e.labels, dtype=np.int64) for e in examples]) if examples else np.zeros(0, np.int64),
        f"{prefix}_lengths": lengths,
    }


def _unpack(arrays, prefix: str, sources: list) -> list[TokenizedExample]:
    ids, labels, lengths = arrays[f"{prefix}_ids"], arrays[f"{prefix}_labels"], arrays[f"{prefix}_lengths"]
    out, pos = [], 0
    for n, src in zip(lengths.tolist(), sources):
        out.append(TokenizedExample(ids[pos:pos + n].tolist(), labels[pos:pos + n].tolist(),
                                    Source(*src) if src else None))
        pos += n
    return out


def _sources(items) -> list:
    """Where each example (or pair) came from, as JSON: [file, row, line] or None."""
    return [[e.source.file, e.source.row, e.source.line] if e.source else None for e in items]


def save_entry(parts: dict, train: list, eval_: list | None, meta: dict, *, pack, suffix: str = "",
               what: str = "tokenised-data") -> str:
    """Write train/eval (packed into arrays by `pack(items, prefix)`) as <cache_dir>/<key><suffix>.npz;
    returns the key. SFT examples and DPO pairs (data/preference.py) share this."""
    key = cache_key(parts)
    folder = cache_dir()
    arrays = pack(train, "train")
    if eval_ is not None:
        arrays.update(pack(eval_, "eval"))
    meta = dict(meta, fingerprint=key, parts=parts, train_sources=_sources(train),
                eval_sources=_sources(eval_) if eval_ is not None else None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: ranks (on one node or on several sharing the disk) tokenise the
        # same data at once, and must not write into one temporary file.
        tmp = folder / f"{key}{suffix}.tmp.{socket.gethostname()}.{os.getpid()}.npz"
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8), **arrays)
        os.replace(tmp, folder / f"{key}{suffix}.npz")
    except OSError as e:  # a read-only or full disk must not stop training
        log.warning("could not write the %s cache in %s: %s", what, folder, e)
    return key


def load_entry(parts: dict, *, unpack, suffix: str = "", what: str = "tokenised data"):
    """(train, eval, meta) of a cached entry written by save_entry, or None (missing or unreadable)."""
    path = cache_dir() / f"{cache_key(parts)}{suffix}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes().decode())
            train = unpack(arrays, "train", meta["train_sources"])
            eval_ = unpack(arrays, "eval", meta["eval_sources"]) if meta.get("eval_sources") is not None else None
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable cache entry %s: %s", path, e)
        return None
    log.info("%s read from cache %s", what, path.name)
    return train, eval_, meta


def save(parts: dict, train: list[TokenizedExample], eval_: list[TokenizedExample] | None, meta: dict) -> str:
    return save_entry(parts, train, eval_, meta, pack=_pack)


def load(parts: dict):
    """(train, eval, meta) for a cached entry of tokenised examples, or None."""
    return load_entry(parts, unpack=_unpack)
