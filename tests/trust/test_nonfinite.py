"""Fail fast on non-finite loss, or drop the step when asked (on_nonfinite: skip), and warn on spikes.

The loop tests inject NaN/inf into the real training loop on a 1-layer in-memory Llama; one test
goes through the CLI on the embedded tiny model to check what a user sees.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from lmpipeline.errors import NonFiniteLossError
from tests.trust._util import Injecting, loop_run, micro_llama, read_metrics, run_cli, write_config

pytestmark = pytest.mark.integration


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nan_loss_stops_with_the_step_and_the_batch_rows(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        loop_run(tmp_path, objective=Injecting({3}))
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg and "nonfinite_step3.json" in msg
    assert "synthetic.jsonl:" in msg  # the first rows of the batch, by file:line
    dump = json.loads((tmp_path / "nonfinite_step3.json").read_text())
    assert dump["step"] == 3 and dump["what"] == "loss"
    assert dump["examples"] and all(x.startswith("synthetic.jsonl:") for x in dump["examples"])
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_drops_exactly_that_step_and_counts_it(tmp_path, bad):
    snapshots = {}
    model = micro_llama()
    snapshots[0] = _params(model)
    result, model = loop_run(tmp_path, model=model, objective=Injecting({3}, bad), on_nonfinite="skip",
                             on_step_end=lambda s: snapshots.__setitem__(s, _params(model)))
    assert result.global_step == 6
    assert result.metrics["nonfinite_skipped_steps"] == 1
    # No update at the skipped step: the weights after step 3 are those after step 2, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = read_metrics(tmp_path / "metrics.jsonl")
    skip = [r for r in recs if r.get("skipped_nonfinite")]
    assert skip == [{"step": 3, "skipped_nonfinite": "loss", "nonfinite_skips": 1}]
    logged = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(logged) == [1, 2, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in logged.values())
    # No scheduler step either: step 4 trains at the learning rate step 3 would have had.
    assert logged[4]["learning_rate"] == pytest.approx(1e-2 * (1 - 2 / 6))
    assert (tmp_path / "nonfinite_step3.json").exists()


def test_skip_is_bounded_by_max_nonfinite_skips(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        loop_run(tmp_path, objective=Injecting({2, 3, 4, 5}), on_nonfinite="skip", max_nonfinite_skips=2)
    assert "at step 4 after 2 skipped step(s)" in str(e.value)


def test_non_finite_gradient_with_finite_loss_is_caught(tmp_path):
    """An inf gradient (finite loss) is caught by the gradient norm, with clipping on or off."""
    model = micro_llama()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 5 else grad  # backward 5 = step 3, first micro-batch

    model.model.embed_tokens.weight.register_hook(poison)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm at step 3"):
        loop_run(tmp_path, model=model, max_grad_norm=0.0)


def test_loss_spike_warns_after_warm_up(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lmpipeline.train.loop")
    result, _ = loop_run(tmp_path, objective=Injecting({14}, 50.0, scale=True), max_steps=15, learning_rate=1e-3)
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    assert len(spikes) == 1 and spikes[0].startswith("loss spike at step 14:"), spikes
    assert result.metrics["loss_spikes"] == 1


def test_no_spike_warning_when_turned_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lmpipeline.train.loop")
    result, _ = loop_run(tmp_path, objective=Injecting({14}, 50.0, scale=True), max_steps=15, loss_spike_factor=0)
    assert not [r for r in caplog.records if "loss spike" in r.getMessage()]
    assert "loss_spikes" not in result.metrics


def test_cli_names_the_step_and_rows_without_a_traceback(tmp_path, tiny_model, quickstart_data, capsys, monkeypatch):
    from lmpipeline.methods import sft

    real = sft.SFTObjective.loss
    calls = {"n": 0}

    def nan_on_third_step(self, model, batch, total_units):
        loss, m = real(self, model, batch, total_units)
        calls["n"] += 1
        return (loss * float("nan"), m) if calls["n"] == 5 else (loss, m)  # GA 2: call 5 is step 3

    monkeypatch.setattr(sft.SFTObjective, "loss", nan_on_third_step)
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", max_steps=4,
                       micro_batch_tokens=None)  # micro-batches as configured: call 5 is step 3's first
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 3, out
    assert "non-finite loss at step 3" in out and "sft_train.jsonl:" in out and "on_nonfinite: skip" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "sft" / "final").exists()
    rows = json.loads((tmp_path / "run" / "sft" / "nonfinite_step3.json").read_text())["examples"]
    assert len(rows) == 4 and all("sft_train.jsonl:" in r for r in rows)  # one micro-batch of 4 rows
