"""Per-rank heartbeats, so that a hung multi-process run says which rank stopped.

Every rank of a multi-process run keeps a daemon thread that, every LMPIPELINE_HEARTBEAT_S
seconds (default 60; 0 turns it off):
  - logs `heartbeat rank R step S phase P (progress Xs ago)` to that rank's log
    (run.log for rank 0, logs/rank-R.log for the others, and the process's stderr), and
  - rewrites <stage>/heartbeat/rank-R.json with the same facts.
The training loop reports its position with `beat(step, phase)`. A thread keeps beating while the
main thread is blocked inside an all-reduce, so during a stall the ranks' lines differ exactly where
the stall is: the rank that is behind (an earlier step or phase, or heartbeats that stopped because
the process died) is the one the others are waiting for.

When a rank has made no progress for half the collective timeout, its thread logs a warning with
`describe_stall` over every rank's heartbeat file; when a collective fails (gloo or NCCL timeout,
a peer that died), the loop turns the error into a UserError that carries the same description.
Ranks on other nodes are seen only when the output folder is on a filesystem that every node
shares (it has to be for multi-node checkpoints anyway); otherwise only this node's ranks are named.

Single-process runs start no thread and write nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from lmpipeline.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_ENV = "LMPIPELINE_HEARTBEAT_S"
DEFAULT_INTERVAL_S = 60.0

# Where a rank can be inside one optimizer step, in order. A rank at an earlier place than the
# others (same step) is the one they wait for. Forward and backward repeat per micro-batch and are
# ordered by it; the last backward of a step is where DDP/FSDP wait for the other ranks' gradients.
PHASES = ("start", "data", "sync: token count", "forward", "backward", "optimizer", "sync: metrics", "eval",
          "checkpoint", "done")
_PER_MICRO = ("forward", "backward")


# How gloo and NCCL word a collective that timed out or lost a peer (they raise plain RuntimeErrors).
_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|nccl|gloo|watchdog|peer", re.I)


class CollectiveError(UserError):
    """A collective (all-reduce, barrier) timed out or lost a peer; the message names the stalled ranks."""

    exit_code = 4


def interval_from_env() -> float:
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds: using %.0f", HEARTBEAT_ENV, raw, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S


def _position(rec: dict) -> tuple[int, int, int, int]:
    phase = rec.get("phase", "start")
    if phase in _PER_MICRO:
        return int(rec.get("step", 0)), PHASES.index("forward"), int(rec.get("micro") or 0), _PER_MICRO.index(phase)
    return int(rec.get("step", 0)), PHASES.index(phase) if phase in PHASES else 0, 0, 0


def _where(rec: dict) -> str:
    micro = f" of micro-batch {rec['micro'] + 1}" if rec.get("phase") in _PER_MICRO and rec.get("micro") is not None else ""
    return f"step {rec.get('step')} ({rec.get('phase')}{micro})"


def read_heartbeats(folder: Path) -> dict[int, dict]:
    out = {}
    if not folder.is_dir():
        return out
    for p in folder.glob("rank-*.json"):
        try:
            rec = json.loads(p.read_text())
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError):
            continue  # being rewritten right now, or foreign: the next beat will do
    return out


def describe_stall(folder: Path, world: int, *, now: float | None = None, stale_after_s: float = 180.0) -> str:
    """One paragraph naming the ranks the others wait for, from every rank's last heartbeat."""
    now = time.time() if now is None else now
    beats = read_heartbeats(folder)
    lines = []
    missing = [r for r in range(world) if r not in beats]
    stale = [r for r, b in sorted(beats.items()) if now - b.get("time", now) > stale_after_s]
    live = {r: b for r, b in beats.items() if r not in stale}
    behind: list[int] = []
    if live:
        positions = {r: _position(b) for r, b in live.items()}
        lowest = min(positions.values())
        if len(set(positions.values())) > 1:
            behind = sorted(r for r, p in positions.items() if p == lowest)
    for r in missing:
        lines.append(f"rank {r}: no heartbeat file (it never reached training, or its node does not share {folder})")
    for r in stale:
        b = beats[r]
        lines.append(f"rank {r}: heartbeats stopped {now - b['time']:.0f}s ago at {_where(b)}: "
                     f"the process died or is frozen")
    for r in behind:
        b = live[r]
        lines.append(f"rank {r}: behind the others, at {_where(b)}, "
                     f"no progress for {now - b.get('progress_time', now):.0f}s")
    suspects = sorted(set(missing) | set(stale) | set(behind))
    if suspects:
        head = f"stalled rank(s): {', '.join(map(str, suspects))}"
    elif live:
        head = (f"every rank is at {_where(next(iter(live.values())))}: the stall is inside that phase on all "
                f"ranks (a slow filesystem, a deadlock inside the model, or the network)")
    else:
        head = f"no heartbeats found in {folder}"
    others = [f"rank {r}: {_where(b)}" for r, b in sorted(live.items()) if r not in behind]
    return "; ".join([head] + lines + others)


class Heartbeat:
    """Context manager: `with Heartbeat(folder, rank, world) as hb: ... hb.beat(step, phase)`."""

    def __init__(self, folder: Path, rank: int, world: int, *, interval_s: float | None = None,
                 stall_warn_s: float | None = None):
        self.folder = Path(folder)
        self.rank, self.world = rank, world
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.stall_warn_s = stall_warn_s
        self.enabled = world > 1 and self.interval_s > 0
        self.step, self.phase, self.micro = 0, "start", None
        self.progress_time = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at: float | None = None

    @property
    def path(self) -> Path:
        return self.folder / f"rank-{self.rank}.json"

    def beat(self, step: int, phase: str, micro: int | None = None) -> None:
        self.step, self.phase, self.micro, self.progress_time = step, phase, micro, time.time()

    def __enter__(self) -> "Heartbeat":
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            if exc is None:
                self.beat(self.step, "done")
            self._write()
        if self.world > 1 and isinstance(exc, RuntimeError) and _COLLECTIVE_FAILURE.search(str(exc)):
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CollectiveError(
                f"rank {self.rank}: a collective failed at step {self.step} ({self.phase}): {first}. {self.explain()}",
                hint="read the named rank's log (run.log for rank 0, logs/rank-R.log for the others); if a step "
                     "legitimately takes longer, raise LMPIPELINE_COLLECTIVE_TIMEOUT_S") from exc

    def _write(self) -> None:
        rec = {"rank": self.rank, "world": self.world, "step": self.step, "phase": self.phase, "micro": self.micro,
               "progress_time": self.progress_time, "time": time.time(), "pid": os.getpid(),
               "host": os.uname().nodename}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full or vanished disk must not kill training; the log line still shows the beat

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            idle = time.time() - self.progress_time
            log.info("heartbeat rank %d step %d phase %s%s (progress %.0fs ago)", self.rank, self.step, self.phase,
                     f" {self.micro + 1}" if self.micro is not None else "", idle)
            if self.stall_warn_s and idle > self.stall_warn_s and self._warned_at != self.progress_time:
                self._warned_at = self.progress_time
                log.warning("rank %d: no progress for %.0fs at step %d (%s); %s", self.rank, idle, self.step,
                            self.phase, describe_stall(self.folder, self.world, stale_after_s=3 * self.interval_s))

    def explain(self) -> str:
        return describe_stall(self.folder, self.world, stale_after_s=3 * max(self.interval_s, 1.0))
