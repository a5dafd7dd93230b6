"""GPU-only training paths: QLoRA 4-bit (NF4/FP4), 8-bit bases, bitsandbytes optimizers, Liger.

Skipped without CUDA (CI); run on the device machine:  python3 -m pytest -m gpu tests/gpu -q
Each builds a small random Llama in tmp_path and trains a few steps through the real SFT stage.
"""

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def _run(tmp_path, gpu_model, quickstart_data, **overrides):
    from lmpipeline import SFTConfig, SFTStage

    cfg = SFTConfig(stage_name="sft", output_dir=str(tmp_path / "sft"),
                    dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"), max_samples=64,
                    max_seq_length=128, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, bf16=True, assistant_only_loss=True, **overrides)
    stage = SFTStage(cfg)
    result = stage.execute(model_name_or_path=str(gpu_model))
    _run.model = stage.model
    lines = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 4 and all(map(lambda x: x == x and x < 100, losses))
    assert (result.final_dir / "adapter_model.safetensors").exists()
    return lines


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_4bit(tmp_path, gpu_model, quickstart_data, quant_type):
    lines = _run(tmp_path, gpu_model, quickstart_data, use_4bit=True, bnb_4bit_quant_type=quant_type,
                 gradient_checkpointing=True)
    assert lines[-1]["peak_memory_gib"] > 0
    # No float32 copy of the frozen non-quantised weights (models/loading.prepare_kbit_model): they stay
    # bf16, and only the LoRA weights train.
    params = dict(_run.model.named_parameters())
    assert all("lora_" in n for n, p in params.items() if p.requires_grad)
    assert not [n for n, p in params.items() if p.dtype == torch.float32 and not p.requires_grad]


def test_8bit_base(tmp_path, gpu_model, quickstart_data):
    _run(tmp_path, gpu_model, quickstart_data, use_8bit=True)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers(tmp_path, gpu_model, quickstart_data, optim):
    _run(tmp_path, gpu_model, quickstart_data, optim=optim)


def test_liger_kernel(tmp_path, gpu_model, quickstart_data):
    _run(tmp_path, gpu_model, quickstart_data, use_liger_kernel=True, packing=True)


def test_full_finetune_bf16(tmp_path, gpu_model, quickstart_data):
    from lmpipeline import SFTConfig, SFTStage

    cfg = SFTConfig(stage_name="sft", output_dir=str(tmp_path / "sft"), use_lora=False, bf16=True,
                    dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"), max_samples=32,
                    max_seq_length=128, max_steps=2, learning_rate=1e-4)
    result = SFTStage(cfg).execute(model_name_or_path=str(gpu_model))
    assert list(result.final_dir.glob("model*.safetensors"))
