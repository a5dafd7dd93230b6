"""Varlen attention on CUDA (models/attention.py): PyTorch's flash varlen kernel against SDPA.

Skipped without CUDA (CI); run on the device machine:  python3 -m pytest -m gpu tests/gpu -q
"""

import json

import pytest
import torch

from lmpipeline.models import attention

pytestmark = pytest.mark.gpu


def test_kernel_is_there_and_matches_per_example_sdpa_with_gqa():
    assert attention.kernel_available("cuda"), "torch.nn.attention.varlen missing: varlen falls back to SDPA"
    torch.manual_seed(0)
    lengths = [700, 3, 1200, 97, 48]
    total, hq, hkv, d = sum(lengths), 24, 8, 128
    q = torch.randn(1, hq, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    module = torch.nn.Module().train()
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu,
                                                max_length_q=max(lengths))
    grad = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    ref = attention._per_example(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu,
                                 d ** -0.5, 0.0).unsqueeze(0)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    assert (out - ref).abs().max() < 2e-2
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert (a - b).abs().max() / b.abs().max() < 2e-2


def test_kernel_aligns_shared_prompt_causality_to_the_end():
    """The flash kernel must align a segment with fewer queries than keys to its END (rejected replies
    see their whole prompt): the shared-prompt DPO layout rests on it. Forward and gradients against
    each sequence attended on its own."""
    from tests.unit.models.test_varlen_attention import shared_prompt_case

    q, k, v, kwargs, expected = shared_prompt_case("cuda", torch.bfloat16, hq=24, hkv=8, d=128,
                                                   sizes=((150, 220, 300), (8, 500, 40), (400, 1, 90)))
    out, _ = attention.varlen_attention_forward(torch.nn.Module().train(), q, k, v, None, scaling=0.3, **kwargs)
    assert (out[0].float() - expected.float()).abs().max() < 2e-2


def test_sft_packed_varlen_matches_sdpa_block_mask(tmp_path, gpu_model, quickstart_data):
    from lmpipeline import SFTConfig, SFTStage

    losses = {}
    for attn in ("auto", "sdpa"):
        out = tmp_path / attn
        cfg = SFTConfig(stage_name="sft", output_dir=str(out), dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"),
                        max_samples=64, max_seq_length=256, max_steps=4, per_device_train_batch_size=2, packing=True,
                        logging_steps=1, learning_rate=1e-3, bf16=True, lora_dropout=0.0, attn_implementation=attn)
        SFTStage(cfg).execute(model_name_or_path=str(gpu_model))
        losses[attn] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=2e-2)


def test_dpo_packed_pairs_match_padded(tmp_path, gpu_model, quickstart_data):
    """Through the flash kernel: pairs packed with one prompt per pair (the default), packed with the
    prompt per sequence, and padded SDPA rows train alike."""
    from lmpipeline import DPOConfig, DPOStage

    losses = {}
    for name, attn, share in (("shared", "auto", True), ("packed", "auto", False), ("padded", "sdpa", True)):
        out = tmp_path / name
        cfg = DPOConfig(stage_name="dpo", output_dir=str(out), dataset_name_or_path=str(quickstart_data / "dpo_train.jsonl"),
                        max_samples=64, max_seq_length=256, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                        learning_rate=1e-3, bf16=True, lora_dropout=0.0, attn_implementation=attn, share_prompt=share)
        stage = DPOStage(cfg)
        stage.execute(model_name_or_path=str(gpu_model))
        assert stage.layout == name
        losses[name] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    for name in ("shared", "packed"):
        assert losses[name] == pytest.approx(losses["padded"], rel=2e-2, abs=2e-3), name
