"""A checkpoint folder may come from anyone: --resume reads it as data only and never runs its code.

The payload is an object whose unpickling writes a marker file (what an attacker's code would do
first); planted in rng_state.pt, optimizer.pt or scheduler.pt it must be refused with a message that
names the file, and the marker must never appear.
"""

from __future__ import annotations

import os

import pytest
import torch

from lmpipeline.train import checkpoint as ckpt_io
from tests.trust._util import run_cli, stopped_copy

pytestmark = pytest.mark.integration


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory):
    """A copy of the 2-step run, recorded as stopped mid-stage, so --resume loads its last checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt_run")
    _, cfg = stopped_copy(trained_run, folder)
    return folder, cfg


@pytest.mark.parametrize("name", ["rng_state.pt", "optimizer.pt", "scheduler.pt"])
def test_pickle_payload_in_checkpoint_is_refused(trained, tmp_path, capsys, name):
    folder, cfg = trained
    ckpt = ckpt_io.latest_checkpoint(folder / "run" / "sft" / "checkpoints")
    marker = tmp_path / "code_ran"
    original = (ckpt / name).read_bytes()
    try:
        torch.save({"python": _Payload(marker)}, ckpt / name)
        code, out = run_cli(["run", str(cfg), "--resume"], capsys)
    finally:
        (ckpt / name).write_bytes(original)
    assert not marker.exists(), "unpickling the checkpoint ran the planted code"
    assert code == 2, out
    assert str(ckpt / name) in out and "data only" in out, out[-2000:]
    assert "Traceback" not in out


def test_rng_state_round_trips_as_plain_data(tmp_path):
    """What save writes, weights_only reads, and restoring it replays the same random numbers."""
    import random

    import numpy as np

    state = ckpt_io.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt_io.set_rng_state(ckpt_io.read_data_file(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
