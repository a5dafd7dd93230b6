"""lmpipeline deletes only what it created, never writes into an input, and never shares a live run.

One module decides (lmpipeline/outputs.py); each test here is a way a user's files used to be lost:
an output folder that is the model folder or holds the data, an --overwrite that stopped half-way on a
read-only part, a merge that deleted a user's `X.tmp` or replaced the run it read, and two runs
writing into one folder at once. Every test hashes the inputs before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.trust._util import config_for_copy, run_cli, tree_hashes, write_config

pytestmark = pytest.mark.integration


@pytest.fixture()
def trained(trained_run):
    return trained_run


def _copy_model(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    return model


def test_output_dir_equal_to_model_folder_is_refused(tmp_path, tiny_model, quickstart_data, capsys):
    model = _copy_model(tiny_model, tmp_path)
    data = quickstart_data / "sft_train.jsonl"
    cfg = write_config(tmp_path, model, data)
    raw = yaml.safe_load(cfg.read_text())
    raw["output_dir"] = str(model)
    cfg.write_text(yaml.safe_dump(raw))
    before = tree_hashes(model, data)
    for argv in (["run", str(cfg)], ["run", str(cfg), "--resume"], ["run", str(cfg), "--overwrite"],
                 ["validate", str(cfg)]):
        code, out = run_cli(argv, capsys)
        assert code == 2, out
        assert f"the output folder {model.resolve()} is the input model_name_or_path" in out, out[-1500:]
        assert "--resume to continue" not in out
    assert tree_hashes(model, data) == before
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_model.iterdir())


def test_dataset_inside_output_dir_is_refused_on_overwrite(tmp_path, tiny_model, quickstart_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = run / "train.jsonl"
    shutil.copy(quickstart_data / "sft_train.jsonl", data)
    cfg = write_config(tmp_path, tiny_model, data)
    before = tree_hashes(data)
    code, out = run_cli(["run", str(cfg), "--overwrite"], capsys)
    assert code == 2, out
    assert "contains the input stage_configs.sft.dataset_name_or_path" in out and str(data.resolve()) in out, out
    assert tree_hashes(data) == before


def test_overwrite_with_a_read_only_part_deletes_nothing(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = config_for_copy(trained, run, tmp_path)
    locked = run / "sft" / "checkpoints"
    before = tree_hashes(run)
    locked.chmod(0o555)
    try:
        code, out = run_cli(["run", str(cfg), "--overwrite"], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2, out
    assert f"{locked} is read-only: nothing was deleted" in out, out[-1500:]
    assert tree_hashes(run) == before  # run.json, run.log, report.html, metrics and weights all still there


def test_overwrite_keeps_files_lmpipeline_did_not_write(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    notes = run / "my_notes.txt"
    notes.write_text("the user's own file")
    cfg = config_for_copy(trained, run, tmp_path, max_steps=1)
    code, out = run_cli(["run", str(cfg), "--overwrite"], capsys)
    assert code == 0, out[-2000:]
    assert notes.read_text() == "the user's own file"
    assert json.loads((run / "run.json").read_text())["stages"]["sft"]["global_step"] == 1


def test_overwrite_refuses_a_folder_lmpipeline_did_not_make(tmp_path, tiny_model, quickstart_data, capsys):
    folder = tmp_path / "run"
    (folder / "results").mkdir(parents=True)
    (folder / "results" / "table.csv").write_text("a,b\n1,2\n")
    (folder / "run.json").write_text("{}")  # looks like a run, but was not made by lmpipeline
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl")
    before = tree_hashes(folder)
    code, out = run_cli(["run", str(cfg), "--overwrite"], capsys)
    assert code == 2, out
    assert "was not made by this lmpipeline, so --overwrite will not delete it" in out
    assert tree_hashes(folder) == before


def test_merge_leaves_a_users_tmp_folder_alone(trained, tmp_path, capsys):
    users = tmp_path / "merged.tmp"
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    before = tree_hashes(trained, users)
    code, out = run_cli(["merge", str(trained), "--output", str(tmp_path / "merged")], capsys)
    assert code == 0, out[-2000:]
    assert (users / "keep.txt").read_text() == "mine"
    assert (tmp_path / "merged" / "merge_info.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]
    assert tree_hashes(trained, users) == before


def test_merge_into_its_own_run_folder_is_refused(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = tree_hashes(run)
    code, out = run_cli(["merge", str(run), "--output", str(run), "--overwrite"], capsys)
    assert code == 2, out
    assert f"the output folder {run.resolve()} contains the input adapter" in out, out
    assert tree_hashes(run) == before
    # A new folder beside the stage folders overlaps no input: allowed, and the run is left as it was.
    code, out = run_cli(["merge", str(run), "--output", str(run / "merged")], capsys)
    assert code == 0, out[-2000:]
    assert {k: v for k, v in tree_hashes(run).items() if "/merged/" not in k} == before


def test_merge_overwrite_replaces_only_an_earlier_merge(trained, tmp_path, capsys):
    other = tmp_path / "my_model"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\0" * 16)
    before = tree_hashes(trained, other)
    code, out = run_cli(["merge", str(trained), "--output", str(other), "--overwrite"], capsys)
    assert code == 2, out
    assert "not a folder lmpipeline created, so --overwrite will not delete it" in out
    assert tree_hashes(trained, other) == before
    merged = tmp_path / "merged"
    assert run_cli(["merge", str(trained), "--output", str(merged)], capsys)[0] == 0
    code, out = run_cli(["merge", str(trained), "--output", str(merged), "--overwrite"], capsys)
    assert code == 0, out[-2000:]


# The first run waits at its first micro-batch until the test lets it go, so the second surely meets a live run.
_HELD_CHILD = """
import os, sys, time
from lmpipeline.methods import sft
real = sft.SFTObjective.loss
def held(self, *args, **kwargs):
    deadline = time.time() + 120
    while not os.path.exists(os.environ["LMPIPELINE_TEST_GO"]) and time.time() < deadline:
        time.sleep(0.05)
    return real(self, *args, **kwargs)
sft.SFTObjective.loss = held
from lmpipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_run_on_a_live_run_folder_is_refused(tmp_path, tiny_model, quickstart_data, repo_root):
    """Two `python -m lmpipeline run --overwrite` on one folder: the second is refused, naming the
    first, and the first finishes with its outputs whole."""
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", max_steps=3, save_steps=1,
                       gradient_accumulation_steps=1)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root),
           "LMPIPELINE_TEST_GO": str(go)}
    first = subprocess.Popen([sys.executable, "-c", _HELD_CHILD, "run", str(cfg), "--overwrite"], env=env,
                             cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "run" / "sft" / "metrics.jsonl"
        lock = tmp_path / "run" / ".lmpipeline.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None:
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "lmpipeline", "run", str(cfg), "--overwrite"], env=env,
                                cwd=repo_root, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by a running lmpipeline (pid {first.pid} on " in second.stderr, second.stderr[-2000:]
        go.touch()
        assert first.wait(timeout=180) == 0, first.stdout.read()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["stages"]["sft"]["status"] == "done"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3]
    assert (tmp_path / "run" / "sft" / "final" / "adapter_model.safetensors").is_file()
    assert "is in use" not in (tmp_path / "run" / "run.log").read_text()
