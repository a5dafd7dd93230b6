"""The pilot's config rewrite and loss verdict (the run itself: tests/integration/test_lifecycle.py)."""

import json

import pytest

from lmpipeline.config.loader import load_config
from lmpipeline.config.schema import STAGE_ALIASES
from lmpipeline.evaluate.pilot import loss_trend, pilot_config


def _cfg(tmp_path, stages, configs):
    return load_config(data={"model_name_or_path": "org/model", "output_dir": str(tmp_path / "run"),
                             "stages": stages, "stage_configs": configs})


def test_first_training_stage_only_limited_and_never_over_the_real_run(tmp_path):
    cfg = _cfg(tmp_path, ["sft", "dpo"], {"sft": {"dataset_name_or_path": "a.jsonl", "logging_steps": 50},
                                          "dpo": {"dataset_name_or_path": "p.jsonl"}})
    pilot, first, kind, eval_cfg, derived = pilot_config(cfg, steps=20)
    assert pilot.stages == ["sft"] and first == "sft" and kind == "sft"
    sft = pilot.stage("sft")
    assert sft.max_steps == 20 and sft.logging_steps == 2 and sft.save_strategy == "no"
    assert sft.dataset_name_or_path == "a.jsonl"  # no golden set: the stage's own data
    assert pilot.output_dir == str(tmp_path / "run") + "-pilot"
    assert pilot._derived["pilot"] is True and derived["stage_configs.sft.max_steps"] == 20
    assert eval_cfg.golden_set is None


@pytest.mark.skipif("eval" not in STAGE_ALIASES, reason="the eval stage is not registered in the schema yet")
def test_golden_set_of_the_eval_stage_becomes_the_training_data(tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n")
    cfg = _cfg(tmp_path, ["sft", "eval"], {"sft": {"dataset_name_or_path": "a.jsonl", "validation_split_ratio": 0.1},
                                           "eval": {"golden_set": str(golden)}})
    pilot, _, _, eval_cfg, _ = pilot_config(cfg, steps=10)
    sft = pilot.stage("sft")
    assert sft.dataset_name_or_path == str(golden) and sft.dataset_format == "prompt_completion"
    assert sft.column_mapping == {"completion": "reference"} and sft.validation_split_ratio == 0.0
    assert eval_cfg.golden_set == str(golden) and pilot.stages == ["sft"]


def test_loss_trend(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0},
                                                       {"step": 2, "loss": 1.5}, "oops"]))
    trend = loss_trend(path)
    assert trend["loss_fell"] is True and trend["first_loss"] == 2.0 and trend["last_step"] == 2
    path.write_text(json.dumps({"step": 1, "loss": 2.0}))
    assert loss_trend(path)["loss_fell"] is None
