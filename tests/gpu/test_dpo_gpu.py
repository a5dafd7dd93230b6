"""DPO with QLoRA on the GPU (seed 004's setting on a small random model): completes, peak memory recorded.

Run on the device machine:  python3 -m pytest -m gpu tests/gpu -q -s
"""

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("use_4bit", [True, False], ids=["qlora-nf4", "bf16-lora"])
def test_dpo_qlora_runs_and_records_peak_memory(tmp_path, gpu_model, quickstart_data, use_4bit):
    from lmpipeline.config.schema import DPOConfig
    from lmpipeline.methods.dpo import DPOStage

    torch.cuda.reset_peak_memory_stats()
    cfg = DPOConfig(stage_name="dpo", output_dir=str(tmp_path / "dpo"),
                    dataset_name_or_path=str(quickstart_data / "dpo_train.jsonl"), max_samples=64,
                    max_seq_length=256, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                    learning_rate=5e-5, beta=0.1, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                    use_4bit=use_4bit, bnb_4bit_use_double_quant=True, bf16=True, gradient_checkpointing=True,
                    logging_steps=1)
    result = DPOStage(cfg).execute(model_name_or_path=str(gpu_model))
    lines = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert len(logged) == 6
    assert abs(logged[0]["loss"] - 0.6931) < 0.05  # policy == reference at the start
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in logged[-1]
    print(f"DPO {'QLoRA' if use_4bit else 'bf16 LoRA'}: peak {logged[-1]['peak_memory_gib']:.3f} GiB, "
          f"final loss {logged[-1]['loss']:.4f}")
    assert (result.final_dir / "adapter_model.safetensors").exists()
