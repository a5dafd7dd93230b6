"""Tokenised-data cache hits and misses; `lmpipeline data inspect` for SFT rows, pairs and a packed row."""

import json

import pytest
import yaml

from lmpipeline.cli import main
from lmpipeline.config.schema import SFTConfig
from lmpipeline.data.build import build_sft_data
from lmpipeline.models.loading import load_tokenizer

pytestmark = pytest.mark.integration


def test_second_build_hits_cache_and_token_changes_miss(tiny_model, quickstart_data):
    tok = load_tokenizer(str(tiny_model))
    cfg = SFTConfig(stage_name="sft", dataset_name_or_path=str(quickstart_data / "sft_eval.jsonl"),
                    max_seq_length=128, assistant_only_loss=True)
    first = build_sft_data(cfg, tok)
    second = build_sft_data(cfg, tok)
    assert not first.cache_hit and second.cache_hit
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]
    assert [e.labels for e in second.train] == [e.labels for e in first.train]
    assert not build_sft_data(cfg.model_copy(update={"max_seq_length": 64}), load_tokenizer(str(tiny_model))).cache_hit
    assert not build_sft_data(cfg.model_copy(update={"chat_template": "qwen2.5"}), load_tokenizer(str(tiny_model))).cache_hit


def test_data_inspect_sft_pairs_and_packed(tmp_path, tiny_model, quickstart_data, capsys):
    cfg = {"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "run"), "stages": ["sft", "dpo"],
           "stage_configs": {"sft": {"dataset_name_or_path": str(quickstart_data / "sft_eval.jsonl"),
                                     "assistant_only_loss": True, "max_seq_length": 128},
                             "dpo": {"dataset_name_or_path": str(quickstart_data / "dpo_eval.jsonl"),
                                     "max_seq_length": 128}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "inspect", str(path), "-n", "2", "--jsonl", "--packed"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and rows[-1]["packed"] is True
    assert all(-100 in r["labels"] and len(r["labels"]) == len(r["input_ids"]) for r in rows[:2])
    assert main(["data", "inspect", str(path), "--stage", "dpo", "-n", "2", "--jsonl"]) == 0
    pairs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(pairs) == 2 and {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} <= set(pairs[0])
    assert main(["data", "inspect", str(path), "-n", "1"]) == 0
    text = capsys.readouterr().out
    assert "[[" in text and "tokens" in text  # trained tokens marked, length statistics printed
    assert text.startswith("legend: [[...]] marks trained tokens")  # and the marks explained first
    assert main(["data", "inspect", str(path), "-n", "1", "--jsonl"]) == 0
    assert "legend" not in capsys.readouterr().out  # JSON lines stay machine-readable
