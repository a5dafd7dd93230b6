"""Several processes on the CPU (gloo): the same training as one process, stopped and resumed together,
and the SLURM script's preempt -> checkpoint -> requeue -> resume cycle, run with fake SLURM commands.

The references are one-process runs with twice the gradient accumulation: 2 processes x GA 1 must give
the same per-step losses (the loop shards micro-batches by rank and normalises by the global count).

Why the comparisons can be this tight. `lmpipeline launch` starts every rank with one intra-op thread
(OMP_NUM_THREADS=1), and the reference runs with one thread too, so each micro-batch's forward and
backward run the same CPU kernels on both sides and give bitwise the same gradient. (With the
machine's default thread count the reference's matmuls split their work differently, and on a machine
with more cores than this one that moved one adapter element by 2.5e-6 after 8 Adam steps.) What
remains differs only in exact operations: gloo sums two gradients (a + b == b + a in floating point),
and the loop's x world-size loss scale and DDP's / world-size average are powers of two. So the trained
adapters must be identical. The logged losses are sums of micro-batch metrics reduced in another
order (an all-reduce instead of one process's running sum): a handful of fp32 roundings, each at most
2^-24 relative, so LOSS_RTOL allows 16 of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmpipeline.cli import main
from tests.unit.launch.fakes import install_fake_slurm, job_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
LOSS_RTOL = 16 * 2.0**-24  # ~1e-6: see the module docstring


def write_config(folder: Path, tiny_model, quickstart_data, **sft) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # 5 eval rows = one eval batch: the second rank has none and must still join the eval all-reduce.
    rows = (quickstart_data / "sft_eval.jsonl").read_text().splitlines()[:5]
    (folder / "eval.jsonl").write_text("\n".join(rows) + "\n")
    stage = {
        "dataset_name_or_path": str(quickstart_data / "sft_train.jsonl"),
        "eval_dataset_name_or_path": str(folder / "eval.jsonl"), "eval_strategy": "steps", "eval_steps": 4,
        "max_samples": 64, "max_seq_length": 128, "max_steps": STEPS, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 2e-3, "logging_steps": 1, "save_steps": 100,
        "lora_dropout": 0.0, "assistant_only_loss": True, "seed": 7,
        # Micro-batches as configured, so both runs sum the same micro-batches and the adapters are
        # identical; regrouping under several ranks is tested in tests/unit/data/test_packing.py.
        "micro_batch_tokens": None,
    }
    stage.update(sft)
    cfg = {"model_name_or_path": str(tiny_model), "output_dir": str(folder / "run"), "stages": ["sft"],
           "stage_configs": {"sft": stage}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", LMPIPELINE_HEARTBEAT_S="0.2", **extra)


def launch(config: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmpipeline", "launch", str(config), "--cpu", "--gpus", "2",
           "--main-port", str(free_port()), *args]
    # One thread per rank, as the reference runs: `launch` only defaults OMP_NUM_THREADS, so a value set by
    # the caller (CI often sets one) would reach the ranks and split their matmuls differently.
    return subprocess.Popen(cmd, cwd=REPO, env=env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_first_loss(run_dir: Path, proc: subprocess.Popen) -> None:
    metrics = run_dir / "sft" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"loss"' in metrics.read_text():
            return
        time.sleep(0.02)
    pytest.fail(f"no loss logged (exit {proc.poll()}):\n{proc.communicate()[0][-3000:] if proc.poll() is not None else ''}")


def assert_same_losses(got: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=LOSS_RTOL), f"step {step}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, quickstart_data) -> tuple[dict[int, float], Path]:
    """One process, GA 2: the global batch of two processes with GA 1."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, tiny_model, quickstart_data, gradient_accumulation_steps=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched ranks' thread count: the same kernels (module docstring)
    try:
        assert main(["run", str(config)]) == 0
    finally:
        torch.set_num_threads(threads)
    return losses(folder / "run"), folder / "run"


def test_two_processes_equal_one_process_with_twice_the_accumulation(tmp_path, tiny_model, quickstart_data, reference):
    ref_losses, ref_run = reference
    config = write_config(tmp_path, tiny_model, quickstart_data)
    proc = launch(config)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "run"
    assert_same_losses(losses(run), ref_losses)  # also: one line per step, written by rank 0 only
    assert_same_losses(losses(run, "eval_loss"), losses(ref_run, "eval_loss"))  # steps 0, 4, 8

    from safetensors.torch import load_file

    mine, theirs = (load_file(r / "sft" / "final" / "adapter_model.safetensors") for r in (run, ref_run))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), (k, float((mine[k] - theirs[k]).abs().max()))
    assert json.loads((run / "run.json").read_text())["stages"]["sft"]["status"] == "done"
    assert "heartbeat rank 1 step" in (run / "logs" / "rank-1.log").read_text()
    assert {p.name for p in (run / "sft" / "heartbeat").iterdir()} == {"rank-0.json", "rank-1.json"}


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_resume_matches(tmp_path, tiny_model, quickstart_data,
                                                                           reference):
    config = write_config(tmp_path, tiny_model, quickstart_data)
    run = tmp_path / "run"
    proc = launch(config)
    wait_for_first_loss(run, proc)
    rank1 = json.loads((run / "sft" / "heartbeat" / "rank-1.json").read_text())["pid"]
    os.kill(rank1, signal.SIGUSR1)  # rank 0 gets nothing: it must stop with rank 1 or hang
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]  # torchrun reports the workers' exit 75 as a failure
    assert out.count("checkpoint saved") == 2, out[-3000:]  # both ranks stopped
    stopped_at = max(losses(run))
    assert stopped_at < STEPS
    assert (run / "sft" / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()
    assert json.loads((run / "run.json").read_text())["stages"]["sft"]["status"] == "preempted"

    proc = launch(config, "--resume")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert_same_losses(losses(run), reference[0])


def test_slurm_script_checkpoints_requeues_and_resumes(tmp_path, tiny_model, quickstart_data, reference):
    # One CPU process with GA 2 under the script: the path (srun -> launch -> torchrun -> trainer) is the same.
    config = write_config(tmp_path, tiny_model, quickstart_data, gradient_accumulation_steps=2)
    assert main(["slurm", str(config), "--cpu", "--requeue", "--output-dir", str(tmp_path / "slurm")]) == 0
    script = tmp_path / "slurm" / "config.sbatch"
    bin_dir, calls = install_fake_slurm(tmp_path)
    run = tmp_path / "run"
    lmp = f"{sys.executable} -m lmpipeline"

    def job(restart: int) -> subprocess.Popen:
        e = job_env(bin_dir, calls, restart=restart, LMPIPELINE_CMD=lmp, MAIN_PORT=str(free_port()))
        e.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # the reference's one thread
        return subprocess.Popen(["bash", str(script)], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = job(0)
    wait_for_first_loss(run, first)
    first.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit, to the batch shell
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-3000:]
    assert "scontrol requeue 4242" in calls.read_text(), out[-3000:]
    stopped_at = max(losses(run))
    assert stopped_at < STEPS and (run / "sft" / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()

    second = job(1)  # what SLURM runs after the requeue: the same script
    out, _ = second.communicate(timeout=180)
    assert second.returncode == 0, out[-3000:]
    assert calls.read_text().count("scontrol requeue") == 1
    assert_same_losses(losses(run), reference[0])


def test_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path, tiny_model):
    """FSDP2 runs on the CPU too (gloo): lmpipeline.train.sharded's checkpoint of a sharded LoRA model,
    loaded into a freshly initialised one, continues exactly like the uninterrupted run."""
    worker = Path(__file__).with_name("fsdp2_resume_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(worker), str(tiny_model), str(tmp_path)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    # Both runs happen in the same two processes (same kernels, same thread count) and the checkpoint
    # round-trips fp32 tensors bitwise, so the resumed steps compute exactly what the uninterrupted ones did.
    assert result["resumed"] == result["reference"]
    assert "adapter_model.safetensors" in result["files"] and "optimizer.pt" in result["files"]

    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors"))
    assert keys and all(".default." not in k and "lora_" in k for k in keys)  # PEFT's own file format
