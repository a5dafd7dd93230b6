"""Every shipped example config validates and estimates offline, and its local data exists.

`validate --config-only` and `estimate` run in-process through the CLI entry point with every network
connection refused, so an example that would need a download (a model's config, a tokenizer) fails
here instead of on a user's machine. Hub models resolve to the architecture configs shipped in
lmpipeline/config/model_configs; Hub datasets are not read by the estimate.
"""

import json
import socket
from pathlib import Path

import pytest
import yaml

from lmpipeline.cli import main
from lmpipeline.config.loader import load_config
from lmpipeline.config.schema import TRAINING_KINDS

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "examples").glob("*.yaml"))
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".ndjson")
PLACEHOLDER = "path/to/"  # a verbatim TRL-style config's stand-in that its header says to replace


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"an example tried to open a network connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_examples_are_found():
    # the named use cases each have their example (a rename must update this list and the README)
    for name in ("llama3-8b-dpo-qlora.yaml", "qwen2.5-32b-chatml-full-fsdp2.yaml", "llama2-7b-pilot.yaml",
                 "llama2-7b-full.yaml", "seed000_config.yaml", "seed001_trl_sft.yaml", "quickstart.yaml"):
        assert f"examples/{name}" in EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_validates_and_estimates_offline(example, repo_root, monkeypatch, capsys, no_network):
    monkeypatch.chdir(repo_root)
    assert main(["validate", example, "--config-only"]) == 0, capsys.readouterr().err
    assert "config OK" in capsys.readouterr().out
    assert main(["estimate", example, "--json"]) == 0, capsys.readouterr().err
    plans = json.loads(capsys.readouterr().out)
    cfg = load_config(example)
    training = [s for s, kind in cfg.stage_kinds.items() if kind in TRAINING_KINDS]
    generating = [s for s, kind in cfg.stage_kinds.items() if kind == "eval" and cfg.stage(s).golden_set]
    assert [p["stage"] for p in plans] == training + generating
    plans = [p for p in plans if p["kind"] != "generation"]  # the checks below are the training plans'
    if cfg.model_name_or_path or cfg.preset:  # the verbatim TRL-style configs name no model: nothing to size
        for plan in plans:
            assert "reason" not in plan, plan.get("reason")
            assert plan["memory"]["peak_gib"] > 0


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_local_data_exists(example, repo_root, monkeypatch):
    """A local data path in an example must exist in the repo (Hub names and placeholders aside)."""
    monkeypatch.chdir(repo_root)
    cfg = load_config(example)
    missing = []
    for name, params in cfg.stage_configs.items():
        for key in ("dataset_name_or_path", "eval_dataset_name_or_path", "golden_set", "eval_dataset"):
            value = params.get(key)
            if isinstance(value, str) and value.endswith(DATA_SUFFIXES) and not value.startswith(PLACEHOLDER):
                if not Path(value).exists():
                    missing.append(f"stage_configs.{name}.{key}: {value}")
    assert not missing


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_says_how_to_use_real_data(example, repo_root):
    """Each example's header comment tells the reader how to point it at their own data."""
    text = (repo_root / example).read_text(encoding="utf-8")
    header = text.split("\n" + next(line for line in text.splitlines() if line and not line.startswith("#")))[0]
    assert "dataset_name_or_path" in header or "dataset.path" in header, header
    assert yaml.safe_load(text)  # and the file is plain YAML
