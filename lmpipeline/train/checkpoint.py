"""Atomic checkpoints: everything needed to continue a run exactly, written all-or-nothing.

A checkpoint is written under `checkpoint-N.tmp`, every file fsynced, then renamed to `checkpoint-N`;
a kill in the middle leaves only a .tmp folder, which is ignored and cleaned up (on the next save
and on --resume), so the previous checkpoint stays the one a resume uses. Deleting works the same
way backwards: a checkpoint is first renamed to .tmp, then removed, so a kill during rotation never
leaves a half-deleted folder under a checkpoint's name. Only the main process writes.

Contents: trainable weights (adapter or full model, safetensors), optimizer, scheduler, the RNG
states of python/numpy/torch, and trainer_state.json (step, epoch, position in the epoch).

Every file is read back as data only (`read_data_file`: torch's weights_only unpickler, safetensors,
JSON): a checkpoint folder may come from anyone, and a full unpickle of it could run their code.
The RNG states are therefore saved as plain tensors, numbers and strings, never as numpy objects.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lmpipeline.errors import UserError

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(folder)


def rng_state() -> dict:
    """The RNG states as plain data (tensors, ints, floats, strings) that weights_only can read."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{step}"
    tmp = folder / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(folder)  # the rename itself; the files inside were synced above
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Unfinished .tmp folders are not checkpoints."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def _remove(ckpt: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-way leaves a .tmp folder, never a broken checkpoint."""
    doomed = ckpt.with_name(ckpt.name + ".old.tmp")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_partial(folder: Path) -> list[Path]:
    """Delete the .tmp leftovers of saves or deletions that were killed half-way; returns what went."""
    if not folder.is_dir():
        return []
    gone = sorted(folder.glob("checkpoint-*.tmp"))
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def rotate_checkpoints(folder: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond `keep`; the newest complete one is never deleted."""
    remove_partial(folder)
    if not keep:
        return
    ckpts = list_checkpoints(folder)
    for p in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
        _remove(p)


def load_trainable_weights(model, ckpt: Path) -> None:
    """Put a checkpoint's trainable weights back into `model` (adapter or full weights)."""
    from safetensors.torch import load_file

    adapter = ckpt / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) are saved once; anything else missing is a broken checkpoint.
    real_missing = [k for k in missing if "lm_head" not in k]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")


def read_data_file(path: Path):
    """A .pt file of a checkpoint, read as data only (tensors, numbers, strings, lists, dicts).

    Anything else in it (a pickled object, a numpy array, code) is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint file {path} holds more than tensors and plain data ({first[:200]}); "
            "lmpipeline reads checkpoints as data only, so it was not loaded",
            key="--resume",
            hint="resume only from checkpoints this version of lmpipeline wrote; if you did not write this "
                 "file, do not load it with anything that unpickles (it can run code)") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"cannot read checkpoint file {path}: {str(e).splitlines()[0] if str(e) else e!r}",
                        key="--resume", hint="the checkpoint is damaged: delete it to resume from an earlier one") from None


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {ckpt / STATE_FILE}: {e}", key="--resume",
                        hint="the checkpoint is damaged: delete it to resume from an earlier one") from None


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler) -> dict:
    # Everything read before anything is applied: a refused file leaves the model as it was.
    rng = read_data_file(ckpt / "rng_state.pt")
    optim = read_data_file(ckpt / "optimizer.pt")
    sched = read_data_file(ckpt / "scheduler.pt")
    state = read_trainer_state(ckpt)
    load_trainable_weights(model, ckpt)
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(sched)
    set_rng_state(rng)
    return state
