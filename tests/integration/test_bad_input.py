"""Bad input stops before training with one message naming the key and file (and line), exit 2."""

import json

import pytest
import yaml

from lmpipeline.cli import main

pytestmark = pytest.mark.integration


def config(tmp_path, tiny_model, data, **extra):
    stage = {"dataset_name_or_path": str(data), "max_steps": 1, "max_seq_length": 64}
    stage.update(extra.pop("stage", {}))
    cfg = {"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "stage_configs": {"sft": stage}}
    cfg.update(extra)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_missing_data_file(tmp_path, tiny_model, capsys):
    p = config(tmp_path, tiny_model, tmp_path / "nope.jsonl")
    code, err = run(["run", str(p)], capsys)
    assert code == 2
    assert "stage_configs.sft.dataset_name_or_path" in err and "nope.jsonl" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_missing_model_folder(tmp_path, quickstart_data, capsys):
    p = config(tmp_path, tmp_path / "no-model", quickstart_data / "sft_train.jsonl")
    code, err = run(["run", str(p)], capsys)
    assert code == 2 and "model_name_or_path" in err and "does not exist" in err
    assert f"{p}:1" in err  # the line of the key in the config file


def test_dataset_with_no_usable_rows(tmp_path, tiny_model, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": ""}\nnot json\n')
    p = config(tmp_path, tiny_model, data, stage={"dataset_format": "alpaca"})
    code, err = run(["run", str(p)], capsys)
    assert code == 2
    assert "stage_configs.sft.dataset_name_or_path" in err
    assert f"{data}:3" in err  # the malformed line, by number


def test_unknown_stage_and_key(tmp_path, tiny_model, quickstart_data, capsys):
    p = config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", stage={"lerning_rate": 1e-3})
    code, err = run(["validate", str(p)], capsys)
    assert code == 2 and "unknown key (did you mean `learning_rate`?)" in err
    p2 = tmp_path / "c2.yaml"
    p2.write_text(p.read_text().replace("- sft", "- sfft").replace("lerning_rate", "learning_rate"))
    code, err = run(["validate", str(p2)], capsys)
    assert code == 2 and "unknown stage `sfft`" in err


def test_qlora_without_gpu_fails_before_training(tmp_path, tiny_model, quickstart_data, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", stage={"use_4bit": True})
    code, err = run(["run", str(p)], capsys)
    assert code == 2 and "stage_configs.sft.use_4bit" in err and "GPU" in err
    assert not (tmp_path / "run" / "sft" / "checkpoints").exists()


def test_validate_reports_rows_with_lines(tmp_path, tiny_model, capsys):
    data = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}, {"instruction": "e", "output": "f"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    p = config(tmp_path, tiny_model, data)
    assert main(["validate", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"{data}:2" in out and f"{data}:4" in out and "rows read" in out
