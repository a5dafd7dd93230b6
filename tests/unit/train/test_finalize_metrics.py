"""The loop's optional Objective hook: finalize_metrics(record) sees every logged train and eval record
after the sums are divided by the units (KTO turns its sums into per-class means with it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmpipeline.config.schema import SFTConfig
from lmpipeline.data.build import SFTData, make_batch_plans
from lmpipeline.data.types import DataReport
from lmpipeline.methods.sft import SFTObjective
from lmpipeline.train.loop import evaluate, finalized
from tests.trust._util import loop_run, micro_llama, read_metrics, synthetic_examples


class Doubling(SFTObjective):
    """An objective whose derived metric is twice the per-unit loss (of train or eval records)."""

    def finalize_metrics(self, record: dict) -> dict:
        out = dict(record)
        for prefix in ("", "eval_"):
            if prefix + "loss" in out:
                out[prefix + "loss_twice"] = 2 * out[prefix + "loss"]
        return out


def test_train_records_pass_through_the_hook(tmp_path):
    loop_run(tmp_path, objective=Doubling(), max_steps=2)
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "learning_rate" in r]
    assert len(train) == 2
    assert all(r["loss_twice"] == 2 * r["loss"] for r in train)


def test_eval_records_pass_through_the_hook(tmp_path):
    cfg = SFTConfig(output_dir=str(tmp_path), use_lora=False, per_device_train_batch_size=2,
                    per_device_eval_batch_size=2, micro_batch_tokens=None)
    data = SFTData(train=synthetic_examples(4), eval=synthetic_examples(4, seed=1), report=DataReport())
    _, eval_plan = make_batch_plans(cfg, data, SimpleNamespace(pad_token_id=0))
    out = evaluate(micro_llama(), Doubling(), eval_plan, cfg, "cpu", None)
    assert out["eval_loss_twice"] == pytest.approx(2 * out["eval_loss"])


def test_objectives_without_the_hook_are_unchanged():
    record = {"loss": 1.5, "units": 3}
    assert finalized(SFTObjective(), record) is record
