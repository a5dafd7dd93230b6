"""The SFT stage end to end on the embedded tiny model (CPU, seconds per run)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lmpipeline.cli import main

pytestmark = pytest.mark.integration


def write_config(tmp_path, tiny_model, quickstart_data, **sft):
    stage = {
        "dataset_name_or_path": str(quickstart_data / "sft_train.jsonl"),
        "max_samples": 64,
        "max_seq_length": 128,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "save_steps": 3,
        "assistant_only_loss": True,
        "seed": 7,
    }
    stage.update(sft)
    cfg = {"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "stage_configs": {"sft": stage}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_run_writes_layout_and_adapter_loads_with_peft(tmp_path, tiny_model, quickstart_data):
    cfg = write_config(tmp_path, tiny_model, quickstart_data)
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    record = json.loads((run / "run.json").read_text())
    assert record["stages"]["sft"]["status"] == "done"
    assert record["config"]["stage_configs"]["sft"]["lora_r"] == 16  # resolved defaults are stored
    assert record["versions"]["torch"] and record["stages"]["sft"]["data"]["fingerprint"]
    final = run / "sft" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    assert (run / "sft" / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
    steps = losses(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, final)
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4), "the adapter must change the model's outputs"


def test_existing_output_is_not_overwritten(tmp_path, tiny_model, quickstart_data, capsys):
    cfg = write_config(tmp_path, tiny_model, quickstart_data, max_steps=1)
    assert main(["run", str(cfg)]) == 0
    before = (tmp_path / "run" / "run.json").read_text()
    assert main(["run", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "run.json").read_text() == before
    assert main(["run", str(cfg), "--overwrite"]) == 0


def test_resume_after_signal_reproduces_uninterrupted_losses(tmp_path, tiny_model, quickstart_data):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_cfg = write_config(tmp_path / "a", tiny_model, quickstart_data, max_steps=8, save_steps=100)
    cfg = write_config(tmp_path / "b", tiny_model, quickstart_data, max_steps=8, save_steps=100)
    assert main(["run", str(ref_cfg)]) == 0
    reference = losses(tmp_path / "a" / "run")

    # The interrupted half runs in a child process: give it this process's thread count, so both halves
    # and the reference split their matmuls alike and the resumed run must log the very same losses.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "lmpipeline", "run", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "b" / "run" / "sft" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends before preemption
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped_at = max(losses(tmp_path / "b" / "run"))
    assert stopped_at < 8, "the run should have stopped early"
    assert (tmp_path / "b" / "run" / "sft" / "checkpoints" / f"checkpoint-{stopped_at}").exists()

    assert main(["run", str(cfg), "--resume"]) == 0
    resumed = losses(tmp_path / "b" / "run")
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == loss, f"step {step}"  # same kernels, state restored bitwise: exact


def test_python_api_in_seed_001_shape(tmp_path, tiny_model, quickstart_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipeline import SFTConfig, SFTStage

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = SFTConfig(stage_name="trl_sft", output_dir=str(tmp_path / "trl_sft"),
                       dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"), max_samples=32,
                       max_seq_length=128, max_steps=2, packing=True, neftune_noise_alpha=5.0)
    result = SFTStage(config).execute(model, tokenizer)
    assert result.final_dir == tmp_path / "trl_sft" / "final"
    assert (result.final_dir / "adapter_config.json").exists()
    assert result.global_step == 2


def test_stages_runs_a_subset_then_resume_runs_the_next_from_it(tmp_path, tiny_model, quickstart_data, capsys):
    """`--stages sft` trains SFT alone; `--stages dpo --resume` then starts DPO from that SFT model."""
    path = write_config(tmp_path, tiny_model, quickstart_data, max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"] = ["sft", "dpo"]
    cfg["stage_configs"]["dpo"] = {"dataset_name_or_path": str(quickstart_data / "dpo_train.jsonl"), "max_samples": 8,
                                   "max_seq_length": 128, "max_steps": 1, "per_device_train_batch_size": 2}
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["run", str(path), "--stages", "sft"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"]) == ["sft"] and record["derived"]["stages"] == ["sft"]
    assert not (run / "dpo").exists()
    assert f"sft: " in capsys.readouterr().out
    assert main(["run", str(path), "--stages", "dpo", "--resume"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert list(record["stages"]) == ["sft", "dpo"] and record["stages"]["dpo"]["status"] == "done"
    assert record["stages"]["dpo"]["model"] == record["stages"]["sft"]["final_dir"]
    # each adapter folder's README is its model card, not PEFT's empty template
    sft_card = (run / "sft" / "final" / "README.md").read_text()
    assert "Model Card for Model ID" not in sft_card and "supervised fine-tuning" in sft_card
    assert str(quickstart_data / "sft_train.jsonl") in sft_card and "| lora_r | 16 |" in sft_card
    assert f'PeftModel.from_pretrained(base_model, "{run / "sft" / "final"}")' in sft_card
    dpo_card = (run / "dpo" / "final" / "README.md").read_text()
    assert "preference optimisation" in dpo_card and "| beta | 0.1 |" in dpo_card
    assert "on top of the earlier stages' adapters (sft), summed with its own" in dpo_card
    # one adapter (the SFT and DPO deltas summed) that plain PEFT loads on the base
    assert f'PeftModel.from_pretrained(base_model, "{run / "dpo" / "final"}")' in dpo_card
