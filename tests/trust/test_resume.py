"""Resumed == uninterrupted, whatever stopped the run: Ctrl-C (checkpoint and exit 130), a second
Ctrl-C or kill -9 (the last complete checkpoint is kept), with padded and packed batches.

The interrupted runs are real `python -m lmpipeline run` processes; a wrapper slows each micro-batch
by a sleep (numerics untouched) so that the signal lands mid-run, not after the last step. Every
resumed run must log the same loss at every step as the run that was never interrupted, exactly: both
run one thread (the child gets OMP_NUM_THREADS=1, the references set it), so the same kernels meet the
same bitwise-restored weights, optimizer state, RNG state and data order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from lmpipeline.train import checkpoint as ckpt_io
from tests.trust._util import run_cli, step_losses, write_config

pytestmark = pytest.mark.integration

STEPS = 8
# Resume-relevant settings: LoRA dropout on (the RNG state must be restored), several epochs
# (max_samples 24 / (2 x GA 2) = 6 steps an epoch, so 8 steps cross an epoch boundary).
RUN = dict(max_steps=STEPS, max_samples=24, per_device_train_batch_size=2, gradient_accumulation_steps=2,
           save_steps=2, lora_dropout=0.1)

_CHILD = """
import sys, time
from lmpipeline.methods import sft
real = sft.SFTObjective.loss
def slow(self, *args, **kwargs):
    time.sleep(0.1)
    return real(self, *args, **kwargs)
sft.SFTObjective.loss = slow
from lmpipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(cfg, repo_root):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, "run", str(cfg)], env=env, cwd=repo_root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return
        time.sleep(0.02)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"condition not reached (exit {proc.poll()}):\n{out[-3000:]}")


def _assert_same_losses(resumed: dict, reference: dict):
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert resumed[step] == loss, f"step {step}: {resumed[step]} != {loss}"


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model, quickstart_data):
    """Uninterrupted runs, padded and packed, computed once for the module."""
    import torch

    from lmpipeline.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for packing in (False, True):
        folder = tmp_path_factory.mktemp(f"reference_packing_{packing}")
        cfg = write_config(folder, tiny_model, quickstart_data / "sft_train.jsonl", packing=packing, **RUN)
        assert main(["run", str(cfg)]) == 0
        out[packing] = step_losses(folder / "run")
    torch.set_num_threads(before)
    return out


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_model, quickstart_data, references, repo_root,
                                                      capsys):
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", packing=False, **RUN)
    metrics = tmp_path / "run" / "sft" / "metrics.jsonl"
    proc = _start(cfg, repo_root)
    _wait_for(lambda: metrics.exists() and '"loss"' in metrics.read_text(), proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Ctrl-C" in out and "checkpoint saved" in out and "--resume" in out and "Traceback" not in out
    stopped = max(step_losses(tmp_path / "run"))
    assert stopped < STEPS
    assert ckpt_io.latest_checkpoint(tmp_path / "run" / "sft" / "checkpoints").name == f"checkpoint-{stopped}"

    code, log = run_cli(["run", str(cfg), "--resume"], capsys)
    assert code == 0, log
    _assert_same_losses(step_losses(tmp_path / "run"), references[False])


def test_kill_9_with_packing_resumes_from_the_last_checkpoint(tmp_path, tiny_model, quickstart_data, references,
                                                              repo_root, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lmpipeline.train.loop")
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", packing=True, **RUN)
    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    proc = _start(cfg, repo_root)
    _wait_for(lambda: (ckpts / "checkpoint-2").is_dir(), proc)
    time.sleep(0.3)  # somewhere in step 3 or 4, or writing checkpoint-4
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = ckpt_io.latest_checkpoint(ckpts)
    assert last is not None and int(last.name.split("-")[1]) < STEPS

    code, log = run_cli(["run", str(cfg), "--resume"], capsys)
    assert code == 0, log
    assert f"resumed from {last} at step {last.name.split('-')[1]}" in caplog.text
    _assert_same_losses(step_losses(tmp_path / "run"), references[True])
    assert not list(ckpts.glob("*.tmp"))


def test_second_ctrl_c_stops_at_once():
    """The first Ctrl-C asks for a checkpoint at the step's end; a second one does not wait for it."""
    from lmpipeline.train.loop import _StopSignal

    # A shell that starts pytest in the background hands it SIGINT ignored: the handler to get back is
    # whatever was there before, not necessarily Python's default.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.received == signal.SIGINT  # still running: the step finishes, then saves
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
