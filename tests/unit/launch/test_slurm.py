"""`lmpipeline slurm`: the sbatch scripts, run end to end with fake srun/scontrol/sbatch and a stub trainer."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lmpipeline.cli import main
from lmpipeline.launch.slurm import SlurmSpec, training_script
from tests.unit.launch.fakes import install_fake_slurm, job_env

# Stands in for `python -m lmpipeline`: records its arguments; on USR1 "checkpoints" and exits 75.
STUB = """#!/bin/bash
echo "stub $*" >> "$FAKE_SLURM_CALLS"
if [ -n "${STUB_EXIT:-}" ]; then exit "$STUB_EXIT"; fi
on_usr1() {
    echo "stub USR1" >> "$FAKE_SLURM_CALLS"
    if [ -n "${STUB_RUN_JSON:-}" ]; then echo '{"stages": {"sft": {"status": "preempted"}}}' > "$STUB_RUN_JSON"; fi
    exit "${STUB_STOP_EXIT:-75}"
}
trap on_usr1 USR1
touch "$STUB_READY"
while :; do sleep 0.05; done
"""


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "my-run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": str(tmp_path / "run"), "stages": ["sft"],
                                    "stage_configs": {"sft": {"dataset_name_or_path": "d.jsonl"}}}))
    return path


def _write(tmp_path, config, *extra) -> Path:
    assert main(["slurm", str(config), "--output-dir", str(tmp_path / "slurm"), *extra]) == 0
    return tmp_path / "slurm" / f"{config.stem}.sbatch"


def test_script_has_the_sbatch_lines_and_passes_bash_n(tmp_path, config):
    script = _write(tmp_path, config, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
                    "--account", "proj_1", "--qos", "high", "--venv", str(tmp_path / "venv"), "--requeue",
                    "--strategy", "fsdp2", "--set", "stage_configs.sft.learning_rate=1e-4", "--sbatch=--constraint=a100")
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=12:00:00", "#SBATCH --account=proj_1", "#SBATCH --qos=high", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --constraint=a100", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "LMPIPELINE_COLLECTIVE_TIMEOUT_S", "export HF_HUB_OFFLINE=1", f"source {tmp_path / 'venv' / 'bin' / 'activate'}",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1', 'scontrol requeue "$SLURM_JOB_ID"',
                 "--gpus 8 --nodes 4 --strategy fsdp2 --set stage_configs.sft.learning_rate=1e-4", "--resume"):
        assert line in text, line
    sbatch_lines = [i for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH")]
    first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    assert max(sbatch_lines) < first_command, "sbatch stops reading #SBATCH lines at the first command"


def _run_script(tmp_path, script, *, wait_ready: bool, signal_it: bool, **env_extra):
    bin_dir, calls = install_fake_slurm(tmp_path)
    stub = tmp_path / "stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    ready = tmp_path / "stub.ready"
    env = job_env(bin_dir, calls, LMPIPELINE_CMD=str(stub), STUB_READY=str(ready), **env_extra)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait_ready:
        deadline = time.time() + 20
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the stub trainer never started"
    if signal_it:
        proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` delivers to the batch shell
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, calls.read_text()


def test_usr1_checkpoints_then_requeues(tmp_path, config):
    rc, out, calls = _run_script(tmp_path, _write(tmp_path, config, "--requeue"), wait_ready=True, signal_it=True)
    assert rc == 0, out
    assert "scontrol show hostnames localhost,second-node" in calls
    assert "stub USR1" in calls and "scontrol requeue 4242" in calls
    stub_line = next(l for l in calls.splitlines() if l.startswith("stub launch"))
    assert f"launch {config.resolve()} --gpus 1 --nodes 1 --strategy ddp --main-address localhost --main-port 24242 --resume" in stub_line


def test_usr1_without_requeue_exits_75_and_says_how_to_continue(tmp_path, config):
    rc, out, calls = _run_script(tmp_path, _write(tmp_path, config), wait_ready=True, signal_it=True)
    assert rc == 75 and "submit this script again" in out
    assert "scontrol requeue" not in calls


def test_requeues_when_srun_reports_a_killed_node_but_the_run_was_preempted(tmp_path, config):
    # Several nodes: srun stops the other nodes itself once the first exits 75, and may report 137.
    (tmp_path / "run").mkdir()
    rc, out, calls = _run_script(tmp_path, _write(tmp_path, config, "--requeue"), wait_ready=True, signal_it=True,
                                 STUB_STOP_EXIT="137", STUB_RUN_JSON=str(tmp_path / "run" / "run.json"))
    assert rc == 0 and "scontrol requeue 4242" in calls, out


def test_a_failed_run_is_not_requeued(tmp_path, config):
    rc, out, calls = _run_script(tmp_path, _write(tmp_path, config, "--requeue"), wait_ready=False, signal_it=False,
                                 STUB_EXIT="3")
    assert rc == 3 and "scontrol requeue" not in calls


def test_setup_script(tmp_path):
    assert main(["slurm", "--setup", "--venv", str(tmp_path / "venv"), "--output-dir", str(tmp_path / "s"),
                 "--partition", "small", "--module", "cray-python"]) == 0
    script = tmp_path / "s" / "setup_venv.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert f"-m venv {tmp_path / 'venv'}" in text and "pip install" in text and "[gpu]" in text
    assert "module load cray-python" in text and "#SBATCH --partition=small" in text


def test_submit_prints_the_job_id(tmp_path, config, monkeypatch, capsys):
    bin_dir, calls = install_fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_CALLS", str(calls))
    assert main(["slurm", str(config), "--output-dir", str(tmp_path / "slurm"), "--submit"]) == 0
    assert "submitted: job 4242" in capsys.readouterr().out
    assert calls.read_text().startswith("sbatch --parsable")


def test_errors(tmp_path, config, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\nstages: [sft]\nstage_configs: {sft: {learning_rat: 1}}\n")
    assert main(["slurm", str(bad), "--output-dir", str(tmp_path)]) == 2  # found before the job queues
    assert "learning_rat" in capsys.readouterr().err
    assert main(["slurm", "--output-dir", str(tmp_path)]) == 2
    assert main(["slurm", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert main(["slurm", str(config), "--nodes", "0", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--setup" in err and "does not exist" in err and "at least 1" in err


def test_cpu_script_asks_for_no_gpus(config):
    text = training_script(SlurmSpec(str(config), cpu=True))
    assert "--gpus-per-node" not in text and " --cpu " in text


def test_script_goes_to_the_run_folder_not_the_checkout(tmp_path, config, monkeypatch, capsys):
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["slurm", str(config)]) == 0
    script = tmp_path / "run" / "slurm" / f"{config.stem}.sbatch"
    assert script.is_file() and f"wrote {script}" in capsys.readouterr().out
    assert f"{tmp_path / 'run' / 'slurm' / 'logs'}/%x-%j-node%n.log" in script.read_text()  # its logs beside it
    assert main(["slurm", "--setup", "--venv", str(tmp_path / "venv")]) == 0
    assert (work / "outputs" / "slurm-setup" / "setup_venv.sbatch").is_file()  # under outputs/, which git ignores
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
