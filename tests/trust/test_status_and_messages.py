"""A run that stops says so (run.json, the report, the console), and every message names its input.

- A failed stage is "failed" with its message in run.json and report.html; Ctrl-C and SIGTERM
  outside a training step record "interrupted".
- Anything that escapes a command is one paragraph naming the command and the stage, exit code 70,
  with the traceback in run.log only.
- Empty data files are called empty, by name; bad flag values are refused before anything loads; an
  output path of the wrong kind (a file where a folder goes, or the reverse) is named.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.trust._util import run_cli, train_tiny_run, tree_hashes, write_config

pytestmark = pytest.mark.integration


@pytest.fixture()
def trained(trained_run):
    return trained_run


def _stage(run_dir, name="sft"):
    return json.loads((run_dir / "run.json").read_text())["stages"][name]


@pytest.mark.parametrize("content,expect", [("", "is empty"), ("\n  \n\n", "holds only blank lines")],
                         ids=["empty", "blank_lines"])
def test_empty_data_is_named_and_the_stage_recorded_failed(tmp_path, tiny_model, capsys, content, expect):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    cfg = write_config(tmp_path, tiny_model, data)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2, out
    assert f"stage_configs.sft.dataset_name_or_path: {data} {expect}" in out, out
    entry = _stage(tmp_path / "run")
    assert entry["status"] == "failed" and f"{data} {expect}" in entry["error"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<b>sft failed</b>" in report and expect in report


def _raising(exc):
    def run_stage(*args, **kwargs):
        if exc == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise exc
    return run_stage


class _Unhandled(Exception):
    """What SIGTERM raises here if the CLI does not handle it (instead of killing the test process)."""


def _unhandled(signum, frame):
    raise _Unhandled


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), "SIGTERM"], ids=["ctrl_c", "sigterm"])
def test_a_stopped_stage_is_recorded_interrupted(tmp_path, tiny_model, quickstart_data, capsys, monkeypatch, exc):
    from lmpipeline import pipeline

    monkeypatch.setattr(pipeline, "run_stage", _raising(exc))
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl")
    previous = signal.signal(signal.SIGTERM, _unhandled)
    try:
        code, out = run_cli(["run", str(cfg)], capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130, out
    assert "interrupted" in out and "--resume" in out
    assert _stage(tmp_path / "run")["status"] == "interrupted"


def test_an_escaping_exception_is_one_paragraph_and_the_traceback_goes_to_run_log(tmp_path, tiny_model, quickstart_data,
                                                                                 capsys, monkeypatch):
    from lmpipeline import cli, pipeline

    monkeypatch.setattr(pipeline, "run_stage", _raising(RuntimeError("boom in the stage")))
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl")
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == getattr(cli, "INTERNAL_ERROR_EXIT_CODE", None) == 70, out
    run_log = tmp_path / "run" / "run.log"
    assert f"internal error in stage `sft` (sft) of the run in {tmp_path / 'run'} while running `lmpipeline run {cfg}`" in out
    assert "RuntimeError: boom in the stage" in out and f"the traceback is in {run_log}" in out, out
    assert "Traceback" not in out
    assert "Traceback (most recent call last)" in run_log.read_text()
    entry = _stage(tmp_path / "run")
    assert entry["status"] == "failed" and entry["error"] == "boom in the stage"


def test_ctrl_c_during_merge_does_not_suggest_resume_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    from lmpipeline.export import merge

    def interrupted(*args, **kwargs):
        args[2].mkdir(parents=True)  # the temporary folder exists when the signal lands
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_save_merged", interrupted)
    before = tree_hashes(trained)
    code, out = run_cli(["merge", str(trained), "--output", str(tmp_path / "merged")], capsys)
    assert code == 130, out
    assert "--resume" not in out and "its output was not written" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert tree_hashes(trained) == before


FLAGS = [
    (["generate", "RUN", "--prompts", "P", "--output", "O", "--batch-size", "0"], "argument --batch-size: must be 1 or more, got 0"),
    (["generate", "RUN", "--prompts", "P", "--output", "O", "--max-new-tokens", "0"], "argument --max-new-tokens: must be 1 or more"),
    (["generate", "RUN", "--prompts", "P", "--output", "O", "--top-p", "5"], "argument --top-p: must be in (0, 1], got 5"),
    (["generate", "RUN", "--prompts", "P", "--output", "O", "--temperature", "-1"], "argument --temperature: must be 0 (greedy) or more"),
    (["generate", "RUN", "--prompts", "P", "--output", "O", "--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["eval", "RUN", "--golden", "P", "--batch-size", "-3"], "argument --batch-size: must be 1 or more, got -3"),
    (["eval", "RUN", "--golden", "P", "--max-samples", "0"], "argument --max-samples: must be 1 or more"),
    (["chat", "RUN", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["data", "inspect", "C", "-n", "0"], "argument -n: must be 1 or more, got 0"),
    (["run", "C", "--pilot", "0"], "argument --pilot: must be 1 or more, got 0"),
]


@pytest.mark.parametrize("argv,expect", FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAGS])
def test_bad_flag_values_are_refused_before_anything_loads(capsys, argv, expect):
    from lmpipeline.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err


def test_output_paths_of_the_wrong_kind_are_named(trained, tmp_path, tiny_model, quickstart_data, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cfg = write_config(tmp_path / "cfg", tiny_model, quickstart_data / "sft_train.jsonl")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "cfg" / "run"), str(a_file)))
    before = tree_hashes(trained, a_file, prompts, cfg)
    cases = [
        (["run", str(cfg)], f"output_dir: {a_file} is an existing file, and a folder is needed here"),
        (["merge", str(trained), "--output", str(a_file)], f"--output: {a_file} is an existing file"),
        (["package", str(trained), "--output-dir", str(a_file)], f"--output-dir: {a_file} is an existing file"),
        (["eval", str(trained), "--golden", str(prompts), "--output-dir", str(a_file)],
         f"--output-dir: {a_file} is an existing file"),
        (["generate", str(trained), "--prompts", str(prompts), "--output", str(a_folder)],
         f"--output: {a_folder} is an existing folder, and a file is needed here"),
        (["report", str(trained), "--output", str(a_folder)], f"--output: {a_folder} is an existing folder"),
    ]
    for argv, expect in cases:
        code, out = run_cli(argv, capsys)
        assert code == 2, (argv, out[-2000:])
        assert expect in out, (argv, out[-2000:])
        assert "Traceback" not in out
    assert tree_hashes(trained, a_file, prompts, cfg) == before
    assert list(a_folder.iterdir()) == []
