"""Equivalences a user relies on without checking, each on the embedded tiny model through the CLI:

- micro-batch 8 x GA 1 == micro-batch 2 x GA 4 (per-step losses, rtol 1e-5): the loss is normalised
  by the trained-token count of the whole optimizer step, not averaged per micro-batch;
- a step's rows regrouped by micro_batch_tokens == the same rows as configured (SFT padding-free and
  DPO padded): fewer, larger micro-batches, the same optimizer steps;
- packed == unpacked (per-step losses, rtol 1e-5) on a batch that holds the same examples either way:
  padding-free packing keeps documents apart (position ids restart, no cross-document attention);
- short SFT (LoRA and full) and DPO runs follow the committed reference curves in
  tests/reference_curves/ (scripts/update_reference_curves.py), within the tolerances below.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.trust._util import run_cli, step_losses, write_config

pytestmark = pytest.mark.integration

CURVES = Path(__file__).resolve().parents[1] / "reference_curves"
# Tolerances of the reference curves, per stage kind: (max |loss - reference| over the steps,
# max |mean(loss - reference)|, the drift). What differs from the committed run is the machine: its
# kernels (AVX-512, AVX2 or plain C; MKL's code path) and library patch versions. That changes the
# first forward by a few fp32 roundings (~1e-7 relative) and 10 optimizer steps amplify it: measured
# over torch threads 1/2/4 and ATEN_CPU_CAPABILITY=avx512/avx2/default (MKL_ENABLE_INSTRUCTIONS=AVX2,
# MKL_CBWR=COMPATIBLE), the curves stay within 5e-6 (SFT) and 9e-6 (DPO) of the committed ones. The
# smallest real change they must catch: 0.1% more learning rate moves the SFT curves by 1.5e-3-1.8e-3
# (drift 8e-4) and the DPO curve, whose losses sit near ln 2, by 6e-5; a changed loss, mask or data
# order moves them far more. So SFT allows 1e-3 (200x the machine noise, under a 0.1% lr change) and
# DPO 2e-4 (20x the noise, about a 0.3% lr change); the drift bound is half of each.
TOLERANCES = {"sft": (1e-3, 5e-4), "dpo": (2e-4, 1e-4)}
# Per-step losses of two runs over the same rows grouped otherwise (micro-batch sizes, packed or padded,
# SFT or DPO): the same arithmetic in other reduction orders (matmul blockings for other row counts and
# padding, the step's token sum split otherwise). An fp32 reduction of n terms in another order moves its
# result by about sqrt(n) roundings of 2^-24: ~32 for the <= 1024 trained tokens of a step, ~11-23 per
# matmul over the tiny model's 128/512 widths, ~39 / loss for the 1536-way log-softmax; about 70 (4e-6)
# in all. 1e-5 is 168 roundings; measured at most 4.5 (2.7e-7) over these 3-5 steps.
STEP_LOSS_RTOL = 1e-5


def _run(tmp_path, capsys, model, data, **stage) -> dict[int, float]:
    return _run_logged(tmp_path, capsys, model, data, **stage)[0]


def _run_logged(tmp_path, capsys, model, data, stage_kind="sft", **stage) -> tuple[dict[int, float], str]:
    """(per-step losses, the run's output)."""
    if stage_kind == "sft":
        cfg = write_config(tmp_path, model, data, **stage)
    else:
        cfg = write_config(tmp_path, model, data, stages=(stage_kind,), extra_stage_configs={stage_kind: stage})
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    return step_losses(tmp_path / "run", stage_kind), out


def _micro_batches(folder: Path, stage: str = "sft") -> list[float]:
    lines = (folder / "run" / stage / "metrics.jsonl").read_text().splitlines()
    return [r["micro_batches_per_step"] for r in map(json.loads, lines) if "micro_batches_per_step" in r]


def _assert_close(a: dict, b: dict, rel: float):
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), f"step {step}: {a[step]} vs {b[step]}"


def test_micro_batch_times_accumulation_equals_one_big_batch(tmp_path, tiny_model, quickstart_data, capsys):
    data = quickstart_data / "sft_train.jsonl"
    common = dict(max_steps=5, max_samples=40, lora_dropout=0.0, learning_rate=2e-3)
    big = _run(tmp_path / "8x1", capsys, tiny_model, data, per_device_train_batch_size=8,
               gradient_accumulation_steps=1, **common)
    accumulated = _run(tmp_path / "2x4", capsys, tiny_model, data, per_device_train_batch_size=2,
                       gradient_accumulation_steps=4, micro_batch_tokens=None, **common)
    assert len(big) == 5
    _assert_close(accumulated, big, rel=STEP_LOSS_RTOL)


def test_token_budget_regrouping_keeps_the_steps(tmp_path, tiny_model, quickstart_data, capsys):
    data = quickstart_data / "sft_train.jsonl"
    common = dict(max_steps=4, max_samples=40, lora_dropout=0.0, learning_rate=2e-3, padding_free=True,
                  per_device_train_batch_size=1, gradient_accumulation_steps=8)
    as_configured = _run(tmp_path / "1x8", capsys, tiny_model, data, micro_batch_tokens=None, **common)
    regrouped, _ = _run_logged(tmp_path / "tokens", capsys, tiny_model, data, micro_batch_tokens=256, **common)
    assert 1 <= max(_micro_batches(tmp_path / "tokens")) < 4  # of the 8 configured
    assert len(regrouped) == 4
    _assert_close(regrouped, as_configured, rel=STEP_LOSS_RTOL)


def test_token_budget_regrouping_keeps_dpo_steps(tmp_path, tiny_model, quickstart_data, capsys):
    data = quickstart_data / "dpo_train.jsonl"
    stage = dict(dataset_name_or_path=str(data), max_samples=32, max_seq_length=128, max_steps=3,
                 per_device_train_batch_size=1, gradient_accumulation_steps=4, learning_rate=5e-3,
                 logging_steps=1, save_strategy="no", lora_dropout=0.0, seed=7)
    as_configured, _ = _run_logged(tmp_path / "1x4", capsys, tiny_model, data, "dpo", micro_batch_tokens=None, **stage)
    regrouped, _ = _run_logged(tmp_path / "tokens", capsys, tiny_model, data, "dpo", micro_batch_tokens=512, **stage)
    assert 1 <= max(_micro_batches(tmp_path / "tokens", "dpo")) < 4  # of the 4 configured
    assert len(regrouped) == 3
    _assert_close(regrouped, as_configured, rel=STEP_LOSS_RTOL)


def test_packed_equals_unpacked(tmp_path, tiny_model, quickstart_data, capsys):
    # 8 examples: one micro-batch of 8 rows unpacked, one micro-batch of a few packed rows.
    common = dict(max_steps=3, max_samples=8, max_seq_length=128, per_device_train_batch_size=8,
                  gradient_accumulation_steps=1, lora_dropout=0.0)
    data = quickstart_data / "sft_train.jsonl"
    unpacked = _run(tmp_path / "unpacked", capsys, tiny_model, data, packing=False, **common)
    packed = _run(tmp_path / "packed", capsys, tiny_model, data, packing=True, **common)
    stats = json.loads((tmp_path / "packed" / "run" / "run.json").read_text())["stages"]["sft"]["data"]
    assert stats["train_examples"] == 8
    _assert_close(packed, unpacked, rel=STEP_LOSS_RTOL)


def _sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(p.stem for p in CURVES.glob("*.json")))
def test_reference_curve(name, tmp_path, tiny_model, repo_root, capsys):
    ref = json.loads((CURVES / f"{name}.json").read_text())
    stage = dict(ref["config"])
    data = repo_root / stage.pop("dataset_name_or_path")
    regenerate = ("regenerate with `python scripts/update_reference_curves.py` and give the reason in the "
                  "commit message")
    assert _sha256(*sorted(Path(tiny_model).glob("*.safetensors"))) == ref["model_weights_sha256"], (
        f"the tiny model's weights are not the ones {name}.json was made with; {regenerate}")
    assert _sha256(data) == ref["data_sha256"], f"{data.name} changed since {name}.json was made; {regenerate}"

    kind = ref["stage"]
    cfg = write_config(tmp_path, tiny_model, data, stages=(kind,), extra_stage_configs={kind: {
        "dataset_name_or_path": str(data), **stage}})
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    got = step_losses(tmp_path / "run", kind)
    want = {int(k): v for k, v in ref["losses"].items()}
    assert sorted(got) == sorted(want)
    deltas = [got[s] - want[s] for s in sorted(want)]
    worst = max(range(len(deltas)), key=lambda i: abs(deltas[i]))
    drift = sum(deltas) / len(deltas)
    env = ref["environment"]
    where = (f"{name}: reference made with torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']} on {env['platform']}")
    max_abs_delta, max_drift = TOLERANCES[kind]
    assert abs(deltas[worst]) <= max_abs_delta, f"{where}; step {worst + 1} differs by {deltas[worst]:+.2e}"
    assert abs(drift) <= max_drift, f"{where}; mean drift {drift:+.2e}"
