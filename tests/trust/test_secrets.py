"""Tokens never reach what a run writes: run.json, run.log, metrics, checkpoints, the model card,
metadata.json or the package archive (members and file names included).

A fake HF_TOKEN and WANDB_API_KEY are planted in the environment, and the HF token also in config
values (a run name and the package description), then every output file is searched for both.
"""

from __future__ import annotations

import gzip
import json
import logging
import tarfile

import pytest

from tests.trust._util import run_cli, write_config

pytestmark = pytest.mark.integration

HF = "hf_FAKEtokenDoNotLeak0123456789abcdef"
WANDB = "wandbFAKEkeyDoNotLeak0123456789abcdef"


def _contents(path):
    """The bytes of a file, and of every member when it is a (gzipped) tar archive."""
    data = path.read_bytes()
    yield str(path), data
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                yield f"{path}!{m.name}", m.name.encode()
                if m.isfile():
                    yield f"{path}!{m.name}", tar.extractfile(m).read()
    elif path.suffix == ".gz":
        yield f"{path}!gunzip", gzip.decompress(data)


def test_tokens_never_reach_run_outputs(tmp_path, tiny_model, quickstart_data, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)  # run.log gets what a real run logs (pytest would keep only warnings)
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    # The token also in a data path: row sources (file:line) of skipped rows are logged and stored.
    data = tmp_path / f"data-{HF}" / "train.jsonl"
    data.parent.mkdir()
    rows = (quickstart_data / "sft_train.jsonl").read_text().splitlines()[:40]
    data.write_text("\n".join(rows + ['{"messages": "not a list"}']) + "\n")
    cfg = write_config(tmp_path, tiny_model, data, stages=("sft", "package"), on_invalid="skip",
                       max_steps=4, save_steps=2, run_name=f"run-{HF}",
                       extra_stage_configs={"package": {"description": f"trained with {HF}", "compress_level": 1}})
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    assert HF not in out and WANDB not in out

    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.suffix for p in files}
    assert {".json", ".jsonl", ".log", ".safetensors", ".gz", ".md"} <= names, names
    assert any(p.name.endswith(".tar.gz") for p in files) and (run / "run.log").stat().st_size > 0
    leaks = []
    for p in files:
        for where, data in _contents(p):
            for secret in (HF, WANDB):
                if secret.encode() in data or secret in where:
                    leaks.append((where, secret[:8]))
    assert not leaks, leaks
    # The leak paths were exercised (the data path is logged with the skipped row), and masked.
    assert "data-***" in (run / "run.log").read_text()
    # The value was not dropped, only masked: the record still says a run name was set.
    assert json.loads((run / "run.json").read_text())["config"]["stage_configs"]["sft"]["run_name"] == "run-***"
