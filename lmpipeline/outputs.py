"""The one rule for every path lmpipeline writes or deletes: it only ever deletes what it created.

- A folder lmpipeline makes for its outputs (a run folder, a merged model, a package folder) carries
  MARKER, a small JSON file saying which kind of output it is. `--overwrite` empties only a folder
  whose marker names the kind being written, and in a run folder only the names lmpipeline writes
  there (its record files and its stage folders); anything else the user put there stays.
- Before anything is deleted, every part that would go is checked: a part without write permission
  (the user made it read-only) refuses the whole overwrite, so nothing is half deleted.
- An output path that equals, contains or lies inside an input (model, tokenizer, data file, golden
  set, adapter) is refused before anything happens, naming both paths.
- Temporary names are unique per process, so a user's own `X.tmp` is never touched.
- A run folder being written is held by an advisory lock (fcntl.flock on LOCK_FILE, the holder's pid
  and host written in it): a second process that would write to a live run is refused, naming the
  holder. The lock goes with the process, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import stat
from pathlib import Path

from lmpipeline.errors import OutputExistsError, UserError

log = logging.getLogger(__name__)

MARKER = ".lmpipeline-output"
LOCK_FILE = ".lmpipeline.lock"
# What a run writes at its top level besides its stage folders (pipeline.py, report/html.py).
RUN_RECORD_NAMES = ("run.json", "run.log", "report.html", "logs", "evaluation")  # evaluation: `lmpipeline eval RUN`


# ------------------------------------------------------------------------------------ markers


def mark(folder: Path, kind: str) -> None:
    """Say that lmpipeline made `folder` for an output of this kind (run, merge, package)."""
    (folder / MARKER).write_text(json.dumps({
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }) + "\n")


def marker_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def unique_temp(path: Path) -> Path:
    """A sibling name no other process and no user file uses, for writing `path` atomically."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


# ------------------------------------------------------------------------------------ overlap


def _resolved(path) -> Path | None:
    p = Path(str(path)).expanduser()
    return p.resolve() if p.exists() else None


def check_disjoint(output: Path, inputs: dict[str, object], *, output_key: str = "output_dir",
                   what: str = "output folder") -> None:
    """Refuse an output path that is, holds or lies inside one of `inputs` ({label: path}).

    Inputs that are not local paths (Hub ids) cannot overlap and are skipped."""
    out = Path(output).expanduser().resolve()
    for label, value in inputs.items():
        if not value:
            continue
        inp = _resolved(value)
        if inp is None:
            continue
        if out == inp:
            how = "is"
        elif out in inp.parents:
            how = "contains"
        elif inp in out.parents:
            how = "is inside"
        else:
            continue
        raise UserError(f"the {what} {out} {how} the input {label} ({inp}); lmpipeline never writes "
                        "into or deletes an input", key=output_key,
                        hint=f"choose an {what} apart from every model, tokenizer, data and adapter path")


def check_is_folder(path: Path, *, key: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is an existing file, and a folder is needed here", key=key,
                        hint="choose a folder path (it is created if missing)")


# ------------------------------------------------------------------------------------ deleting


def _read_only_part(paths: list[Path]) -> Path | None:
    """The first part of `paths` (or of the folders among them) without its owner's write permission."""
    for top in paths:
        walk = [top] if not top.is_dir() or top.is_symlink() else [top, *top.rglob("*")]
        for p in walk:
            try:
                mode = p.lstat().st_mode
            except OSError:
                continue
            if not stat.S_ISLNK(mode) and not mode & stat.S_IWUSR:
                return p
    return None


def remove_paths(paths: list[Path]) -> None:
    """Delete `paths` all or nothing: a read-only part anywhere refuses before the first deletion."""
    blocked = _read_only_part(paths)
    if blocked is not None:
        raise UserError(f"{blocked} is read-only: nothing was deleted", key="--overwrite",
                        hint="make it writable (chmod u+w) if it may go, or choose another output folder")
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_replaceable(folder: Path, kind: str, *, key: str, overwrite: bool) -> None:
    """Refuse, before any work, to replace a non-empty `folder` that lmpipeline did not make for `kind`
    (or any non-empty folder without `overwrite`), or one with a read-only part."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(f"output folder `{folder}` is not empty", key=key,
                                hint="choose another folder or pass --overwrite")
    found = marker_kind(folder)
    if found != kind:
        what = f"a {found} folder" if found else "not a folder lmpipeline created"
        raise OutputExistsError(f"{folder} is {what}, so --overwrite will not delete it", key=key,
                                hint=f"choose another folder for the {kind} output")
    blocked = _read_only_part([folder])
    if blocked is not None:
        raise UserError(f"{blocked} is read-only: nothing was deleted", key=key,
                        hint="make it writable (chmod u+w) if it may go, or choose another output folder")


def put_in_place(tmp: Path, folder: Path) -> None:
    """Move a finished temporary folder to `folder`, replacing what check_replaceable allowed."""
    if folder.exists():
        remove_paths([folder])
    os.replace(tmp, folder)


def check_is_file_target(path: Path, *, key: str) -> None:
    if path.is_dir():
        raise UserError(f"{path} is an existing folder, and a file is needed here", key=key,
                        hint="give a file path, e.g. a name inside that folder")


def run_owned_entries(out: Path, stage_names) -> list[Path]:
    """The entries of a run folder that lmpipeline wrote: its record files and stage folders."""
    names = set(RUN_RECORD_NAMES) | set(stage_names)
    try:
        record = json.loads((out / "run.json").read_text())
        names |= set((record.get("stages") or {}).keys())
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(p for p in out.iterdir() if p.name in names or p.name.startswith(".run.json.tmp"))


# ------------------------------------------------------------------------------------ locking


class RunLock:
    """An advisory lock on a run folder, held while this process writes into it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by a running lmpipeline ({holder}); a second process "
                            "writing into it would corrupt both runs", key="output_dir",
                            hint="wait for that run to finish or stop it, or choose another output_dir") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run, but say it is unguarded
            log.warning("cannot lock %s (%s): a second process could write into this run unnoticed", self.path, e)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
