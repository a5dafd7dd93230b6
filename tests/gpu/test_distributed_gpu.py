"""Multi-GPU training through `lmpipeline launch` (DDP, FSDP2 with LoRA / QLoRA / full fine-tuning, ZeRO-3).

Needs 2 GPUs; skipped otherwise. Run on a 2-GPU machine (each test starts its own processes):
    python3 -m pytest -m gpu tests/gpu/test_distributed_gpu.py -q
or one by hand:  lmpipeline launch CONFIG --gpus 2 --strategy fsdp2
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

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _config(tmp_path: Path, gpu_model, quickstart_data, name="cfg", **sft) -> Path:
    stage = {"dataset_name_or_path": str(quickstart_data / "sft_train.jsonl"), "max_samples": 128,
             "max_seq_length": 128, "max_steps": STEPS, "per_device_train_batch_size": 4,
             "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100,
             "lora_dropout": 0.0, "assistant_only_loss": True, "seed": 7,
             "micro_batch_tokens": None}  # as configured: 2 GPUs and GA 2 sum the same micro-batches
    stage.update(sft)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(gpu_model), "output_dir": str(tmp_path / name),
                                    "stages": ["sft"], "stage_configs": {"sft": stage}}))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmpipeline", "launch", str(config), "--gpus", "2", "--main-port", str(_port()), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), LMPIPELINE_HEARTBEAT_S="5")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_ok(config: Path, *args: str) -> str:
    proc = _launch(config, *args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _one_process(tmp_path, gpu_model, quickstart_data, **sft) -> dict[int, float]:
    from lmpipeline.cli import main

    config = _config(tmp_path, gpu_model, quickstart_data, name="single", gradient_accumulation_steps=2, **sft)
    assert main(["run", str(config)]) == 0
    return _losses(tmp_path / "single")


def _close(a: dict, b: dict, rel: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel), f"step {k}: {a[k]} vs {b[k]}"


def test_ddp_two_gpus_equal_one_gpu_with_twice_the_accumulation(tmp_path, gpu_model, quickstart_data):
    reference = _one_process(tmp_path, gpu_model, quickstart_data)
    _run_ok(_config(tmp_path, gpu_model, quickstart_data))
    _close(_losses(tmp_path / "cfg"), reference, rel=1e-4)  # fp32; GPU reductions are not bit-exact


def test_fsdp2_lora_matches_ddp_saves_a_full_adapter_and_resumes(tmp_path, gpu_model, quickstart_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # 200 eval rows in batches of 8: 13 batches on rank 0, 12 on rank 1; the sharded forwards must still pair up.
    evals = {"eval_dataset_name_or_path": str(quickstart_data / "sft_eval.jsonl"), "eval_strategy": "steps",
             "eval_steps": 4}
    reference = _one_process(tmp_path, gpu_model, quickstart_data, **evals)
    config = _config(tmp_path, gpu_model, quickstart_data, **evals)
    run = tmp_path / "cfg"
    proc = _launch(config, "--strategy", "fsdp2")
    metrics = run / "sft" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-4000:]
    stopped = max(_losses(run))
    assert (run / "sft" / "checkpoints" / f"checkpoint-{stopped}" / "adapter_model.safetensors").exists()

    _run_ok(config, "--strategy", "fsdp2", "--resume")
    _close(_losses(run), reference, rel=1e-3)
    # The saved adapter is whole (gathered from both ranks), in PEFT's format.
    base = AutoModelForCausalLM.from_pretrained(gpu_model)
    tuned = PeftModel.from_pretrained(base, run / "sft" / "final")
    lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)


def test_fsdp2_qlora(tmp_path, gpu_model, quickstart_data):
    pytest.importorskip("bitsandbytes")
    config = _config(tmp_path, gpu_model, quickstart_data, use_4bit=True, bf16=True, max_steps=4,
                     gradient_checkpointing=True)
    _run_ok(config, "--strategy", "fsdp2")
    assert (tmp_path / "cfg" / "sft" / "final" / "adapter_model.safetensors").exists()
    assert all(l < 100 for l in _losses(tmp_path / "cfg").values())


def test_fsdp2_full_finetune_saves_whole_weights(tmp_path, gpu_model, quickstart_data):
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, gpu_model, quickstart_data, use_lora=False, max_steps=2, learning_rate=1e-4)
    _run_ok(config, "--strategy", "fsdp2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cfg" / "sft" / "final")
    original = AutoModelForCausalLM.from_pretrained(gpu_model)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in original.parameters())


def test_zero3_trains_and_saves(tmp_path, gpu_model, quickstart_data):
    pytest.importorskip("deepspeed")
    config = _config(tmp_path, gpu_model, quickstart_data, max_steps=4, save_strategy="no")
    _run_ok(config, "--strategy", "zero3")
    assert (tmp_path / "cfg" / "sft" / "final" / "adapter_model.safetensors").exists()


def test_fsdp2_dpo_saves_a_whole_adapter(tmp_path, gpu_model, quickstart_data):
    """DPO under FSDP2: the reference (adapter disabled) and policy forwards run sharded, and the final
    adapter is gathered from both ranks before the main process writes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stage = {"dataset_name_or_path": str(quickstart_data / "dpo_train.jsonl"), "max_samples": 64,
             "max_seq_length": 256, "max_steps": 4, "per_device_train_batch_size": 2,
             "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "beta": 0.1, "logging_steps": 1,
             "save_strategy": "no", "lora_dropout": 0.0, "bf16": True}
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(gpu_model), "output_dir": str(tmp_path / "run"),
                                      "stages": ["dpo"], "stage_configs": {"dpo": stage}}))
    _run_ok(config, "--strategy", "fsdp2")
    lines = [json.loads(l) for l in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert len(logged) == 4 and abs(logged[0]["loss"] - 0.6931) < 0.05  # policy == reference at the start
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpu_model), tmp_path / "run" / "dpo" / "final")
    lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # every rank's shard made it into the file
