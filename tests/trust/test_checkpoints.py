"""Checkpoints are all-or-nothing: a kill while saving or rotating never costs the previous one.

save_checkpoint writes checkpoint-N.tmp, fsyncs it and renames it; rotation renames a checkpoint to
.tmp before deleting it. So a folder named checkpoint-N is always complete, .tmp folders are
leftovers that listing ignores and the next save or --resume removes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lmpipeline.train import checkpoint as ckpt_io
from tests.trust._util import loop_run, read_metrics

pytestmark = pytest.mark.integration


class _Model:
    """Enough of a model for save_checkpoint: save_pretrained writes a weights file of `size` bytes."""

    def __init__(self, size: int = 1 << 16, chunk: int = 1 << 16):
        self.size, self.chunk = size, chunk

    def save_pretrained(self, folder, safe_serialization=True):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            for _ in range(self.size // self.chunk):
                f.write(b"\0" * self.chunk)
                f.flush()


def _opt():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _save(folder, step, keep=None, model=None):
    opt, sched = _opt()
    ckpt_io.save_checkpoint(folder, step, model=model or _Model(), optimizer=opt, scheduler=sched,
                            trainer_state={"global_step": step})
    ckpt_io.rotate_checkpoints(folder, keep)


def test_only_complete_checkpoints_are_listed_in_step_order(tmp_path):
    for step in (2, 9, 10):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-12.tmp").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-12.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "checkpoint-11").mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "checkpoint-2.old.tmp").mkdir()  # a deletion killed half-way
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-13").write_text("a file, not a folder")
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert ckpt_io.list_checkpoints(tmp_path / "missing") == [] and ckpt_io.latest_checkpoint(tmp_path / "missing") is None


def test_save_total_limit_never_deletes_the_newest(tmp_path):
    for step in range(1, 8):
        _save(tmp_path, step, keep=2)
        names = [p.name for p in ckpt_io.list_checkpoints(tmp_path)]
        assert names[-1] == f"checkpoint-{step}" and len(names) == min(step, 2)
    # A newer but unfinished save does not count as a checkpoint: the newest complete one stays.
    (tmp_path / "checkpoint-9.tmp").mkdir()
    ckpt_io.rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]


def test_failure_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 2)
    opt, sched = _opt()

    class Dies:  # the process dies after the weights were written, before optimizer state
        def state_dict(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(tmp_path, 4, model=_Model(), optimizer=Dies(), scheduler=sched,
                                trainer_state={"global_step": 4})
    assert (tmp_path / "checkpoint-4.tmp" / "model.safetensors").exists()
    assert ckpt_io.latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text()) == {"global_step": 2}
    assert [p.name for p in ckpt_io.remove_partial(tmp_path)] == ["checkpoint-4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


_SAVER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from lmpipeline.train import checkpoint as ckpt_io

    class Model:  # 8 MB of weights, written in 256 KB chunks: a wide window to be killed in
        def save_pretrained(self, folder, safe_serialization=True):
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                for _ in range(32):
                    f.write(bytes(1 << 18))
                    f.flush()

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder, step = Path({folder!r}), 0
    while True:
        step += 1
        ckpt_io.save_checkpoint(folder, step, model=Model(), optimizer=opt, scheduler=sched,
                                trainer_state={{"global_step": step}})
        ckpt_io.rotate_checkpoints(folder, 2)
""")


def test_kill_9_while_saving_and_rotating_leaves_a_usable_checkpoint(tmp_path, repo_root):
    """SIGKILL a process that saves 8 MB checkpoints back to back (rotating, keep 2), at random moments."""
    rng = random.Random(0)
    for attempt in range(2):
        folder = tmp_path / f"attempt{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _SAVER.format(root=str(repo_root), folder=str(folder))],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while time.time() < deadline and len(ckpt_io.list_checkpoints(folder)) < 2 and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        ckpts = ckpt_io.list_checkpoints(folder)
        assert ckpts, f"attempt {attempt}: no usable checkpoint left"
        for c in ckpts:  # every listed checkpoint is whole
            assert (c / "model.safetensors").stat().st_size == 8 << 20
            assert json.loads((c / "trainer_state.json").read_text())["global_step"] == int(c.name.split("-")[1])
            torch.load(c / "optimizer.pt", weights_only=True)
            torch.load(c / "scheduler.pt", weights_only=True)
        ckpt_io.remove_partial(folder)
        assert not list(folder.glob("*.tmp"))


def test_resume_ignores_and_cleans_a_half_written_checkpoint(tmp_path):
    """A run dies after checkpoint-2 while writing checkpoint-4; --resume continues from 2 exactly."""
    reference, _ = loop_run(tmp_path / "ref", max_steps=6, save_strategy="no")
    ref = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r}

    run = tmp_path / "run"

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # killed during step 4's save, say: only checkpoint-2 is whole

    with pytest.raises(KeyboardInterrupt):
        loop_run(run, max_steps=6, save_strategy="steps", save_steps=2, on_step_end=crash)
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpt_io.list_checkpoints(ckpts)] == ["checkpoint-2"]
    half = ckpts / "checkpoint-4.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes((ckpts / "checkpoint-2" / "model.safetensors").read_bytes()[:100])

    result, _ = loop_run(run, max_steps=6, save_strategy="steps", save_steps=2, resume=True)
    assert result.global_step == 6
    assert not half.exists()
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in ref.items():
        assert got[step] == loss, step  # one process, same kernels, checkpoint restored bitwise: exact
