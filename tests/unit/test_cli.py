"""The command line's own behaviour: --version, --stages, the end-of-run summary, one console per run."""

import logging

import pytest

from lmpipeline import __version__
from lmpipeline.cli import console_handler, main, stage_summary
from lmpipeline.config.errors import ConfigError
from lmpipeline.config.loader import load_config, select_stages


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lmpipeline {__version__}"


def test_select_stages_keeps_the_config_order(repo_root):
    cfg = select_stages(load_config(repo_root / "examples" / "quickstart.yaml"), ["dpo", "sft"])
    assert cfg.stages == ["sft", "dpo"] and cfg._derived["stages"] == ["sft", "dpo"]


def test_unknown_stage_is_refused_with_the_valid_ones(repo_root, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="`sfx` is not a stage of this config"):
        select_stages(load_config(repo_root / "examples" / "quickstart.yaml"), ["sfx"])
    monkeypatch.chdir(repo_root)
    assert main(["run", "examples/quickstart.yaml", "--stages", "sft,evaluate"]) == 2  # before anything runs
    err = capsys.readouterr().err
    assert "--stages: `evaluate` is not a stage of this config" in err
    assert "its stages: sft, dpo, eval, merge, package" in err


def test_summary_shows_results_and_archive_not_none():
    eval_entry = {"kind": "eval", "final_dir": None, "metrics": {"exact_match": 0.303, "base_exact_match": 0.0,
                                                                  "eval_loss": 0.8703, "base_eval_loss": 6.578},
                  "notes": {"results": "outputs/q/eval/results.json"}}
    line = stage_summary("eval", eval_entry)
    assert line == ("  eval: exact_match=0.303 (base 0), eval_loss=0.8703 (base 6.578) -> outputs/q/eval/results.json")
    package = {"kind": "package", "final_dir": None, "notes": {"archive": "outputs/q/package/q.tar.gz"}}
    assert stage_summary("package", package) == "  package: outputs/q/package/q.tar.gz"
    sft = {"kind": "sft", "final_dir": "outputs/q/sft/final", "metrics": {"train_loss": 0.91234, "train_tokens": 51197}}
    assert stage_summary("sft", sft) == "  sft: train_loss=0.9123, train_tokens=51,197 -> outputs/q/sft/final"
    assert "None" not in stage_summary("x", {"final_dir": None})


@pytest.mark.parametrize("rank, level", [(None, logging.INFO), ("0", logging.INFO), ("1", logging.WARNING)])
def test_only_the_main_process_logs_info_to_the_terminal(monkeypatch, rank, level):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert console_handler(logging.INFO).level == level


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_the_summary_is_printed_once_per_launch(repo_root, monkeypatch, capsys, rank, printed):
    import lmpipeline.pipeline

    record = {"config": {"output_dir": "outputs/q"}, "stages": {"sft": {"final_dir": "outputs/q/sft/final"}}}
    monkeypatch.setattr(lmpipeline.pipeline, "run_pipeline", lambda cfg, **kw: record)
    monkeypatch.setenv("RANK", rank)
    assert main(["run", str(repo_root / "examples" / "quickstart.yaml"), "--stages", "sft"]) == 0
    assert ("done: 1 stage(s); outputs in outputs/q" in capsys.readouterr().out) is printed


def test_stages_and_pilot_do_not_combine(repo_root, capsys):
    assert main(["run", str(repo_root / "examples" / "quickstart.yaml"), "--pilot", "3", "--stages", "sft"]) == 2
    assert "--stages does not combine with --pilot" in capsys.readouterr().err
