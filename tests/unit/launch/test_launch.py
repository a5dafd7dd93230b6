"""`lmpipeline launch`: the command it builds, the presets it ships, and how it forwards stop signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lmpipeline.cli import main
from lmpipeline.errors import UserError
from lmpipeline.launch import launch as L


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": str(tmp_path / "run"), "stages": ["sft"],
                                    "stage_configs": {"sft": {"dataset_name_or_path": "d.jsonl"}}}))
    return str(path)


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_single_node_ddp_command(config):
    cmd = L.build_command(L.LaunchSpec(config, gpus=4, overrides=["stage_configs.sft.lr=1e-4"], resume=True))
    assert cmd[1] == "launch" or cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert Path(_after(cmd, "--config_file")) == L.PRESET_DIR / "ddp.yaml"
    assert _after(cmd, "--num_processes") == "4" and _after(cmd, "--num_machines") == "1"
    tail = cmd[len(cmd) - 1 - cmd[::-1].index("-m"):]  # after the last -m: what each process runs
    assert tail == ["-m", "lmpipeline", "run", config, "--set", "stage_configs.sft.lr=1e-4", "--resume"]


def test_multi_node_counts_every_process_and_takes_rank_from_slurm(config, monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "2")
    cmd = L.build_command(L.LaunchSpec(config, gpus=8, nodes=3, main_address="node-a", main_port=23456, strategy="fsdp2"))
    assert _after(cmd, "--num_processes") == "24"  # accelerate counts processes over all machines
    assert _after(cmd, "--machine_rank") == "2"
    assert _after(cmd, "--main_process_ip") == "node-a" and _after(cmd, "--main_process_port") == "23456"
    assert Path(_after(cmd, "--config_file")).name == "fsdp2.yaml"


def test_cpu_uses_torchrun_and_hides_gpus(config):
    spec = L.LaunchSpec(config, gpus=2, cpu=True)
    cmd = L.build_command(spec)
    assert Path(cmd[0]).name == "torchrun" or "torch.distributed.run" in cmd
    assert _after(cmd, "--nproc_per_node") == "2"
    env = L.child_env(spec)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "zero9"}, "unknown strategy"),
    ({"cpu": True, "strategy": "fsdp2"}, "needs GPUs"),
    ({"nodes": 2}, "first node's address"),
    ({"nodes": 2, "node_rank": 2, "main_address": "a"}, "outside 0..1"),
    ({"gpus": 0}, "at least 1"),
])
def test_bad_launch_options_are_user_errors(config, kwargs, message):
    with pytest.raises(UserError, match=message):
        L.build_command(L.LaunchSpec(config, **kwargs))


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        L.build_command(L.LaunchSpec(str(tmp_path / "nope.yaml")))


@pytest.mark.parametrize("strategy", L.STRATEGIES)
def test_presets_load_with_accelerate(strategy):
    from accelerate.commands.config.config_args import load_config_from_file

    path = L.preset_path(strategy)
    loaded = load_config_from_file(str(path))
    assert loaded.mixed_precision == "no"  # the loop applies autocast per stage
    raw = yaml.safe_load(path.read_text())
    if strategy == "fsdp2":
        fsdp = raw["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    if strategy.startswith("zero"):
        assert raw["deepspeed_config"]["zero_stage"] == int(strategy[-1])


def test_exit_code_matches_the_trainer():
    from lmpipeline.train.loop import PREEMPTED_EXIT_CODE

    assert L.PREEMPTED_EXIT_CODE == PREEMPTED_EXIT_CODE


def test_dry_run_prints_the_command(config, capsys):
    assert main(["launch", config, "--gpus", "2", "--dry-run", "--set", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "--num_processes 2" in out and f"lmpipeline run {config} --set seed=3" in out


def test_cli_reports_bad_options(config, capsys):
    assert main(["launch", config, "--nodes", "2", "--dry-run"]) == 2
    assert "--main-address" in capsys.readouterr().err


AGENT = textwrap.dedent("""
    # Stands in for torchrun: starts the worker in a session of its own, exits 1 when it fails.
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)
    sys.exit(1 if worker.wait() else 0)
""")
WORKER = textwrap.dedent("""
    # Stands in for a trainer: on SIGUSR1 records the preemption in run.json and exits 75.
    import json, pathlib, signal, sys, time
    run = pathlib.Path(sys.argv[1])
    def stop(*_):
        (run / "run.json").write_text(json.dumps({"stages": {"sft": {"status": "preempted"}}}))
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    (run / "ready").touch()
    time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_reaches_workers_in_their_own_session_and_exits_75(tmp_path, sig):
    (tmp_path / "agent.py").write_text(AGENT)
    (tmp_path / "worker.py").write_text(WORKER)
    run = tmp_path / "run"
    run.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import sys; from lmpipeline.launch.launch import run_command; from pathlib import Path; "
        f"sys.exit(run_command([sys.executable, {str(tmp_path / 'agent.py')!r}, {str(tmp_path / 'worker.py')!r}, "
        f"{str(run)!r}], run_dir=Path({str(run)!r})))")])
    deadline = time.time() + 20
    while not (run / "ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    launcher.send_signal(sig)
    assert launcher.wait(timeout=20) == L.PREEMPTED_EXIT_CODE


def test_a_crash_is_not_reported_as_preemption(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"stages": {"sft": {"status": "preempted"}}}))
    # A stale "preempted" from an earlier attempt counts only when this launcher forwarded a signal.
    assert L.run_command([sys.executable, "-c", "raise SystemExit(3)"], run_dir=tmp_path / "run") == 3
    assert L.was_preempted(tmp_path / "run") and not L.was_preempted(tmp_path / "missing")
