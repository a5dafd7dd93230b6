"""Heartbeats name the stalled rank; collective failures become errors that say which rank to look at."""

from __future__ import annotations

import json
import logging
import time

import pytest

from lmpipeline.errors import UserError
from lmpipeline.train.heartbeat import CollectiveError, Heartbeat, describe_stall
from lmpipeline.train.runtime import collective_timeout_s


def _beat(folder, rank, step, phase, *, age=0.0, now, micro=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "step": step, "phase": phase, "micro": micro, "time": now - age, "progress_time": now - age - 5}))


def test_the_rank_behind_is_named(tmp_path):
    now = time.time()
    _beat(tmp_path, 0, 5, "sync: metrics", now=now)
    _beat(tmp_path, 1, 5, "forward", micro=0, now=now)
    _beat(tmp_path, 2, 5, "sync: metrics", now=now)
    msg = describe_stall(tmp_path, 3, now=now)
    assert msg.startswith("stalled rank(s): 1") and "step 5 (forward of micro-batch 1)" in msg


def test_a_rank_still_in_its_forward_is_behind_ranks_waiting_in_backward(tmp_path):
    # DDP: the others wait in the last micro-batch's backward (the gradient all-reduce).
    now = time.time()
    _beat(tmp_path, 0, 3, "backward", micro=1, now=now)
    _beat(tmp_path, 1, 3, "forward", micro=1, now=now)
    _beat(tmp_path, 2, 3, "backward", micro=0, now=now)
    assert describe_stall(tmp_path, 3, now=now).startswith("stalled rank(s): 2")
    _beat(tmp_path, 2, 3, "backward", micro=1, now=now)
    assert describe_stall(tmp_path, 3, now=now).startswith("stalled rank(s): 1")


def test_missing_and_silent_ranks_are_named(tmp_path):
    now = time.time()
    _beat(tmp_path, 0, 7, "sync: token count", now=now)
    _beat(tmp_path, 1, 6, "eval", age=600, now=now)
    msg = describe_stall(tmp_path, 3, now=now, stale_after_s=180)
    assert msg.startswith("stalled rank(s): 1, 2")
    assert "rank 1: heartbeats stopped 600s ago" in msg and "rank 2: no heartbeat file" in msg


def test_all_ranks_at_the_same_place(tmp_path):
    now = time.time()
    for r in range(2):
        _beat(tmp_path, r, 3, "checkpoint", now=now)
    assert describe_stall(tmp_path, 2, now=now).startswith("every rank is at step 3 (checkpoint)")


def test_thread_logs_and_writes_heartbeats(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmpipeline.train.heartbeat")
    with Heartbeat(tmp_path, rank=1, world=2, interval_s=0.05) as hb:
        hb.beat(3, "backward", micro=1)
        time.sleep(0.3)
    assert "heartbeat rank 1 step 3 phase backward 2" in caplog.text
    assert json.loads((tmp_path / "rank-1.json").read_text())["phase"] == "done"


def test_single_process_writes_nothing(tmp_path):
    with Heartbeat(tmp_path / "hb", rank=0, world=1, interval_s=0.05):
        time.sleep(0.1)
    assert not (tmp_path / "hb").exists()


def test_long_stall_warns_with_the_description(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmpipeline.train.heartbeat")
    _beat(tmp_path, 1, 1, "data", now=time.time())
    with Heartbeat(tmp_path, rank=0, world=2, interval_s=0.05, stall_warn_s=0.1) as hb:
        hb.beat(2, "sync: token count")
        time.sleep(0.4)
    assert "rank 0: no progress for" in caplog.text and "stalled rank(s): 1" in caplog.text


def test_collective_timeout_becomes_an_error_naming_the_rank(tmp_path):
    _beat(tmp_path, 1, 4, "data", now=time.time())
    with pytest.raises(CollectiveError, match=r"stalled rank\(s\): 1") as info:
        with Heartbeat(tmp_path, rank=0, world=2, interval_s=60) as hb:
            hb.beat(4, "sync: token count")
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")
    assert info.value.exit_code == 4 and "LMPIPELINE_COLLECTIVE_TIMEOUT_S" in str(info.value)


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError):
        with Heartbeat(tmp_path, rank=0, world=2, interval_s=60):
            raise ValueError("Timed out")  # not a RuntimeError: not a collective
    with pytest.raises(RuntimeError, match="shape"):
        with Heartbeat(tmp_path, rank=0, world=2, interval_s=60):
            raise RuntimeError("shape mismatch in matmul")


def test_collective_timeout_setting(monkeypatch):
    monkeypatch.delenv("LMPIPELINE_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 1800
    monkeypatch.setenv("LMPIPELINE_COLLECTIVE_TIMEOUT_S", "90")
    assert collective_timeout_s() == 90
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("LMPIPELINE_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="LMPIPELINE_COLLECTIVE_TIMEOUT_S"):
            collective_timeout_s()
