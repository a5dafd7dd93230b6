"""The memory and time model: its per-layer activation terms against what autograd really saves (CPU),
and the shape of an estimate: parts add up, and the usual levers move the peak the right way."""

from dataclasses import replace

import pytest
import torch

from lmpipeline.methods import method_for
from lmpipeline.plan import hardware
from lmpipeline.plan.estimate import GIB, Setup, TokenProfile, estimate_memory, layer_activation_bytes, layer_constant_bytes
from lmpipeline.plan.suggest import suggestions
from lmpipeline.plan.timing import estimate_time
from lmpipeline.config.presets import Architecture, load_shipped

DPO_TERMS = method_for("dpo").terms

from .saved_bytes import build, saved_bytes_per_token

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = 32


def _configs():
    from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    base = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": (LlamaConfig(**base), "sdpa", ALL7),
        "qwen2": (Qwen2Config(**base), "sdpa", ALL7),
        "qwen3": (Qwen3Config(**base, head_dim=64), "sdpa", ALL7),
        "phi3": (Phi3Config(**{**base, "num_key_value_heads": 4}), "sdpa", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        "gemma2": (Gemma2Config(**base, head_dim=64), "eager", ALL7),
    }


MODES = {  # name: (LoRA kwargs or None for full fine-tuning, fp32 model without autocast, impl)
    # impl "trl": PEFT as it comes (each LoRA input cast to fp32 and back); "lmpipeline": those casts off
    # under autocast (models/speedups.py)
    "lora": (dict(r=8, lora_dropout=0.0), False, "trl"),
    "lora-uncast": (dict(r=8, lora_dropout=0.0), False, "lmpipeline"),
    "lora-fp32": (dict(r=8, lora_dropout=0.0), True, "lmpipeline"),
    "lora-dropout": (dict(r=8, lora_dropout=0.1), False, "trl"),
    "lora-qv": (dict(r=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]), False, "trl"),
    "lora-qv-uncast": (dict(r=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]), False, "lmpipeline"),
    "full": (None, False, "lmpipeline"),
    "full-fp32": (None, True, "lmpipeline"),
}
# Llama/Qwen blocks match to the byte but for RMSNorm's per-token rstd. Phi-3 on CPU: the kernel's
# output layout makes o_proj's input a copy (on CUDA it is a view of what SDPA saved): a few % low.
TOLERANCE = {"llama": 0.01, "qwen2": 0.01, "qwen3": 0.01, "phi3": 0.05, "gemma2": 0.02}


@pytest.mark.parametrize("mask", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(TOLERANCE))
def test_layer_model_matches_autograd(family, mode, mask):
    config, attn, targets = _configs()[family]
    config._attn_implementation = attn
    lora, fp32, impl = MODES[mode]
    if lora is not None:
        lora = {"lora_alpha": 16, "target_modules": targets, **lora}
        if family == "phi3" and mode.startswith("lora-qv"):
            pytest.skip("Phi-3 has no separate q_proj/v_proj")
    model = build(config, lora=lora, dtype=torch.float32 if fp32 else torch.bfloat16,
                  uncast=impl == "lmpipeline" and not fp32)
    measured = saved_bytes_per_token(model, TOKENS, mask=mask, autocast=not fp32)
    arch = Architecture.from_config(config.to_dict(), name=family, source="test")
    setup = Setup(micro_batch=2 if mask else 1, seq_len=TOKENS, use_lora=lora is not None, lora_r=8,
                  lora_targets=lora["target_modules"] if lora else "all-linear",
                  lora_dropout=lora["lora_dropout"] if lora else 0.0, weight_bytes=4 if fp32 else 2,
                  autocast=not fp32, attn=attn, impl=impl, dropout_mask_bytes=4)  # CPU dropout: a float mask
    estimated = layer_activation_bytes(arch, setup, TOKENS) + layer_constant_bytes(arch, setup) / TOKENS
    assert estimated == pytest.approx(measured, rel=TOLERANCE[family])


def test_llama_3b_lora_layer_is_46_8_hidden_per_token():
    """The figure the docstring quotes, on the real Llama-3.2-3B layer shapes (2 layers, small vocabulary)."""
    from transformers import LlamaConfig

    arch = load_shipped("llama-3.2-3b")
    setup = Setup(micro_batch=1, seq_len=128, lora_r=16, lora_targets=ALL7, impl="trl")
    per_token = layer_activation_bytes(arch, setup)
    # 46.67 x hidden: norms 8, LoRA input copies 12 + 16/3 (down), q/k/v/out 5.33, MLP 16; + lora_A outputs
    # (7 x 2r bytes) and the log-sum-exp (4 x heads bytes).
    assert per_token / arch.hidden_size == pytest.approx(140 / 3 + (7 * 32 + 4 * 24) / 3072, abs=1e-6)
    config = LlamaConfig(vocab_size=512, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=24, num_key_value_heads=8)
    config._attn_implementation = "sdpa"
    model = build(config, lora=dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=ALL7), dtype=torch.bfloat16)
    measured = saved_bytes_per_token(model, 128, mask=False, autocast=True)
    assert per_token + layer_constant_bytes(arch, setup) / 128 == pytest.approx(measured, rel=0.002)
    # lmpipeline's casts off: q/k/v and gate/up each share one saved input, o_proj's is attention's:
    # 12 x hidden of LoRA input copies become 4.
    uncast = replace(setup, impl="lmpipeline")
    assert layer_activation_bytes(arch, uncast) / arch.hidden_size == pytest.approx(
        per_token / arch.hidden_size - 8, abs=1e-6)
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
    measured = saved_bytes_per_token(model, 128, mask=False, autocast=True)
    assert layer_activation_bytes(arch, uncast) + layer_constant_bytes(arch, uncast) / 128 == pytest.approx(
        measured, rel=0.002)


@pytest.fixture(scope="module")
def arch3b():
    return load_shipped("llama-3.2-3b")


def qlora_example(**changes):
    base = dict(micro_batch=2, grad_accum=4, seq_len=2048, gradient_checkpointing=True, lora_r=16, lora_targets=ALL7,
                quant="4bit", optim="adamw_8bit")
    return Setup(**{**base, **changes})


def test_estimate_structure(arch3b):
    est = estimate_memory(arch3b, qlora_example())
    assert set(est.parts) <= {"weights", "LoRA adapters", "gradients", "optimizer", "reference model", "activations",
                              "logits/loss", "optimizer temporaries"}
    assert sum(est.parts.values()) == pytest.approx(est.peak)
    assert est.tokens == 4096 and est.row_len == 2048  # no data sample: every padded row assumed full length
    assert est.trainable == 24_313_856  # the bench's trainable count for r16 on 7 modules
    assert est.parts["LoRA adapters"] == est.trainable * 4
    assert est.required == pytest.approx(hardware.required_bytes(est.peak))
    assert est.details["weights"].startswith("NF4")
    d = est.as_dict()
    assert d["peak_gib"] == pytest.approx(est.peak / GIB, abs=1e-3) and d["tokens_per_micro_batch"] == 4096


def test_levers_move_the_peak_the_right_way(arch3b):
    def peak(**c):
        return estimate_memory(arch3b, qlora_example(**c)).peak

    base = peak()
    assert peak(gradient_checkpointing=False) > base
    assert peak(quant="none") > base  # bf16 weights
    assert peak(micro_batch=4) > base and peak(micro_batch=1) < base
    assert peak(seq_len=1024) < base
    assert peak(liger=True) < base  # no full-vocabulary logits
    assert peak(optim="adamw_torch") > base
    # full fine-tuning adds bf16 gradients (2 B) and 8-bit AdamW states (2 B) for every parameter
    assert peak(use_lora=False, quant="none") - peak(quant="none") > 3.9 * arch3b.total_params


def test_nf4_weights_and_bf16_rest(arch3b):
    linear = arch3b.num_layers * arch3b.linear_params_per_layer
    ours = estimate_memory(arch3b, qlora_example()).parts["weights"]
    trl = estimate_memory(arch3b, qlora_example(impl="trl")).parts["weights"]
    embed = arch3b.embedding_params
    assert trl == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 64 / 256) + (embed + arch3b.total_params - linear - embed) * 2)
    # lmpipeline skips peft's fp32 upcast of the rest (models/loading.prepare_kbit_model)
    assert ours == pytest.approx(trl)
    no_dq = estimate_memory(arch3b, qlora_example(double_quant=False)).parts["weights"]
    assert no_dq > ours


def test_logits_memory_follows_the_loss_path(arch3b):
    """SFT: chunked_loss (default) holds one chunk of logits, full_logits the whole [tokens, vocab] in
    fp32 with its gradient; TRL's fused head holds tiles."""
    chunked = estimate_memory(arch3b, qlora_example())
    full = estimate_memory(arch3b, qlora_example(loss_path="full_logits"))
    assert full.phase.startswith("backward (the loss")
    assert full.parts["logits/loss"] >= 12 * 4096 * arch3b.vocab_size
    assert chunked.peak < full.peak - 4 * GIB
    assert any("chunked_loss" in n for n in full.notes)
    trl = estimate_memory(arch3b, qlora_example(impl="trl"))
    assert "logits/loss" not in trl.parts and trl.off_peak["logits/loss"] < 0.3 * GIB


def test_padded_peak_follows_the_data_sample(arch3b):
    profile = TokenProfile(rows=1000, lengths=[100] * 990 + [900] * 10, source="test")
    est = estimate_memory(arch3b, qlora_example(), profile, rows_seen=1000)
    assert est.row_len == 900 and est.tokens == 1800
    short = estimate_memory(arch3b, qlora_example(), profile, rows_seen=10)
    assert short.row_len == 100  # ten rows drawn: the median longest is an ordinary row
    packed = estimate_memory(arch3b, qlora_example(packing=True), profile)
    assert packed.tokens == 4096


def test_dpo_doubles_rows_and_full_finetuning_copies_the_reference(arch3b):
    sft = estimate_memory(arch3b, qlora_example(quant="none", seq_len=1024, impl="trl"))
    dpo = estimate_memory(arch3b, qlora_example(quant="none", seq_len=1024, impl="trl", terms=DPO_TERMS, reference="adapter_disabled"))
    assert dpo.tokens == 2 * sft.tokens
    full = estimate_memory(arch3b, Setup(terms=DPO_TERMS, micro_batch=1, seq_len=512, use_lora=False,
                                         reference="frozen_copy", gradient_checkpointing=True))
    assert full.parts["reference model"] == pytest.approx(full.parts["weights"])


def test_gemma_eager_attention_grows_with_the_square_of_length():
    gemma = load_shipped("gemma-2-2b")
    s = Setup(micro_batch=1, seq_len=1024, attn="eager", lora_targets="all-linear")
    short, long = layer_activation_bytes(gemma, s, 1024), layer_activation_bytes(gemma, s, 2048)
    assert long - short == pytest.approx(gemma.num_heads * 1024 * (4 + 2 + 2))


def test_suggestions_fit_a_smaller_gpu(arch3b):
    setup = qlora_example(quant="none", micro_batch=4, optim="adamw_torch", loss_path="full_logits")
    t4 = hardware.gpu("t4-16gb")
    peak = estimate_memory(arch3b, setup).peak
    assert not hardware.fits(peak, t4)
    found = suggestions(arch3b, setup, t4)
    texts = [t for t, _, _ in found]
    assert any("QLoRA" in t for t in texts) and any("max_seq_length" in t for t in texts)
    assert any("chunked_loss" in t for t in texts) and any("per_device_train_batch_size: 1" in t for t in texts)
    assert any(ok for _, _, ok in found)
    assert all(p < peak for _, p, _ in found)


def test_qlora_is_smaller_than_bf16_lora_at_any_batch(arch3b):
    """The frozen weights stay bf16 for k-bit training (models/loading.prepare_kbit_model skips peft's upcast),
    so the residual stream stays bf16 and QLoRA saves the weights' difference whatever the batch."""
    for gc, batch in ((False, 8), (True, 2)):
        setup = qlora_example(quant="none", gradient_checkpointing=gc, micro_batch=batch)
        bf16, nf4 = estimate_memory(arch3b, setup), estimate_memory(arch3b, replace(setup, quant="4bit"))
        assert bf16.peak - nf4.peak == pytest.approx(bf16.parts["weights"] - nf4.parts["weights"], rel=0.1)
    texts = [t for t, _, _ in suggestions(arch3b, setup, hardware.gpu("t4-16gb"))]
    assert any(t.startswith("use_4bit") for t in texts)


def test_hardware_table_and_headroom():
    assert hardware.gpu("H100").name == "h100-80gb" and hardware.gpu("4090").name == "rtx-4090-24gb"
    with pytest.raises(ValueError, match="known:"):
        hardware.gpu("tpu-v5")
    for peak in (1 * GIB, 10 * GIB, 60 * GIB):
        assert hardware.required_bytes(hardware.max_peak_for(hardware.required_bytes(peak))) == pytest.approx(
            hardware.required_bytes(peak))
    assert hardware.smallest_fitting(5 * GIB).name == "t4-16gb"
    assert hardware.smallest_fitting(30 * GIB).name == "a100-40gb"
    assert hardware.smallest_fitting(500 * GIB) is None
    mems = [g.memory_gib for g in hardware.GPUS]
    assert mems == sorted(mems)


def test_time_from_flops(arch3b):
    h100 = hardware.gpu("h100-80gb")
    lora = estimate_time(arch3b, Setup(micro_batch=2, seq_len=2048, packing=True), h100)
    assert lora.flops_per_token == pytest.approx(4 * 3.2126e9, rel=1e-3)  # GUIDE: 4 x 3.21 GFLOP per token
    gc = estimate_time(arch3b, Setup(micro_batch=2, seq_len=2048, packing=True, gradient_checkpointing=True), h100)
    assert gc.flops_per_token == pytest.approx(6 / 4 * lora.flops_per_token)
    full = estimate_time(arch3b, Setup(micro_batch=2, seq_len=2048, packing=True, use_lora=False), h100)
    assert full.flops_per_token == pytest.approx(6 / 4 * lora.flops_per_token)
    # At 100% of 790 TFLOP/s the LoRA ceiling is the GUIDE's ~61,000 tokens/s.
    assert lora.tokens_per_second / lora.mfu == pytest.approx(61_000, rel=0.02)
    profile = TokenProfile(rows=10_000, lengths=[250] * 100, source="test")
    t = estimate_time(arch3b, Setup(micro_batch=2, grad_accum=4, seq_len=2048), h100, profile, epochs=3)
    assert t.tokens_per_epoch == 10_000 * 250 and t.steps_per_epoch == 1250 and t.total_steps == 3750
    assert t.seconds_total == pytest.approx(3 * t.seconds_per_epoch)
    steps = estimate_time(arch3b, Setup(micro_batch=2, grad_accum=4, seq_len=2048), h100, max_steps=20)
    assert steps.total_tokens == 20 * 8 * 2048 and "upper bound" in steps.basis


def test_micro_batch_tokens_bounds_the_peak_micro_batch(arch3b):
    profile = TokenProfile(rows=3000, lengths=[120, 180, 250, 300, 420, 640, 900] * 20)
    as_configured = estimate_memory(arch3b, qlora_example(padding_free=True, attn="varlen"), profile)
    regrouped = {b: estimate_memory(arch3b, qlora_example(padding_free=True, attn="varlen", micro_batch_tokens=b),
                                    profile) for b in (2048, 4096)}
    # a step's 8 rows fill a micro-batch up to the budget: more tokens than 2 rows, never over the budget
    assert as_configured.tokens < regrouped[2048].tokens == 2048
    assert 2048 < regrouped[4096].tokens <= 4096
    assert as_configured.peak < regrouped[2048].peak < regrouped[4096].peak
    fast = estimate_time(arch3b, qlora_example(padding_free=True, micro_batch_tokens=2048), hardware.gpu("H100"), profile)
    slow = estimate_time(arch3b, qlora_example(padding_free=True), hardware.gpu("H100"), profile)
    assert fast.tokens_per_second > slow.tokens_per_second  # larger micro-batches run at a higher MFU


def test_a_shared_dpo_prompt_runs_once_per_pair(arch3b):
    """share_prompt (DPO under varlen): the time counts a pair's prompt once, its two replies each once."""
    from lmpipeline.config.schema import DPOConfig
    from lmpipeline.plan.estimate import setup_from_stage

    profile = TokenProfile(rows=1000, mean_tokens=400, prompt_tokens=200, lengths=[500] * 50, source="test")
    stage = DPOConfig(stage_name="dpo", output_dir="/tmp/unused", dataset_name_or_path="unused.jsonl", max_steps=10)
    shared, separate = (setup_from_stage(stage.model_copy(update={"share_prompt": on}), method_for("dpo")) for on in (True, False))
    assert shared.shared_prompt and not separate.shared_prompt
    h100 = hardware.gpu("H100")
    t_shared, t_separate = (estimate_time(arch3b, s, h100, profile) for s in (shared, separate))
    # per pair 200 + 2 x 200 reply tokens instead of 2 x 400
    assert t_shared.tokens_per_epoch == pytest.approx(0.75 * t_separate.tokens_per_epoch)
    padded = setup_from_stage(stage.model_copy(update={"attn_implementation": "sdpa"}), method_for("dpo"))
    assert not padded.shared_prompt  # the prompt is shared only in varlen's packed rows


def test_gpus_without_the_flash_kernel_are_planned_padded(arch3b):
    """T4 and V100 (compute capability < 8.0) have no varlen kernel: DPO pairs run padded under SDPA there,
    so their rows of the fit table and a plan for them use that layout's (larger) peak."""
    from lmpipeline.config.schema import DPOConfig
    from lmpipeline.plan.stage_plan import plan_stage

    stage = DPOConfig(stage_name="dpo", output_dir="/tmp/unused", dataset_name_or_path="unused.jsonl",
                      max_seq_length=1024, per_device_train_batch_size=4, max_steps=10)
    profile = TokenProfile(rows=1000, mean_tokens=300, prompt_tokens=150,
                           lengths=[120, 200, 350, 500, 800] * 20, source="test")
    on_h100 = plan_stage(stage, method_for("dpo"), arch3b, device=hardware.gpu("h100-80gb"), profile=profile)
    on_v100 = plan_stage(stage, method_for("dpo"), arch3b, device=hardware.gpu("v100-32gb"), profile=profile)
    assert on_h100.setup.attn == "varlen" and on_h100.setup.shared_prompt
    assert on_v100.setup.attn == "sdpa" and not on_v100.setup.padding_free and not on_v100.setup.shared_prompt
    assert on_v100.memory.peak > on_h100.memory.peak


def test_the_plan_says_what_torch_compile_auto_will_do(arch3b):
    """auto depends on the run's length: the plan names the decision its step count leads to, and plans the
    memory eager (the larger of the two)."""
    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.plan.stage_plan import plan_stage

    profile = TokenProfile(rows=40_000, mean_tokens=300, lengths=[120, 200, 350, 500, 800] * 20, source="test")
    common = dict(stage_name="sft", output_dir="/tmp/unused", dataset_name_or_path="unused.jsonl", bf16=True,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=1)
    gpu = hardware.gpu("h100-80gb")
    long = plan_stage(SFTConfig(**common), method_for("sft"), arch3b, device=gpu, profile=profile)
    assert long.time.total_steps == 5_000
    assert long.resolved["torch_compile"].startswith("true (5,000 optimizer steps")
    assert not long.setup.compiled
    pilot = plan_stage(SFTConfig(**common, max_steps=20), method_for("sft"), arch3b, device=gpu, profile=profile)
    assert pilot.resolved["torch_compile"].startswith("false (20 optimizer steps")
    explicit = plan_stage(SFTConfig(**common, torch_compile=True), method_for("sft"), arch3b, device=gpu, profile=profile)
    assert "torch_compile" not in explicit.resolved and explicit.setup.compiled


def test_forwards_without_gradients_and_a_score_head_count(arch3b):
    """FLOPs per trained token: LoRA's 4N, plus 2N for each further forward per trained row. DPO's reference
    runs both rows of a pair (2N, as before); KTO's example runs its KL row on the policy without
    gradients and the reference on both rows (3 forwards: 6N); precomputed, only the KL row (2N). A reward
    model's tokens skip the vocabulary head (N less V x H)."""
    h100 = hardware.gpu("h100-80gb")
    N = arch3b.matmul_params

    def flops(method, reference):
        setup = Setup(terms=method_for(method).terms, micro_batch=2, seq_len=1024, reference=reference)
        return estimate_time(arch3b, setup, h100).flops_per_token

    assert flops("dpo", "adapter_disabled") == pytest.approx(6 * N)
    assert flops("dpo", "precomputed") == pytest.approx(4 * N)
    assert flops("kto", "adapter_disabled") == pytest.approx(10 * N)
    assert flops("kto", "precomputed") == pytest.approx(6 * N)
    assert flops("orpo", "none") == pytest.approx(4 * N)
    assert flops("rm", "none") == pytest.approx(4 * (N - arch3b.vocab_size * arch3b.hidden_size))
    rm = estimate_memory(arch3b, Setup(terms=method_for("rm").terms, micro_batch=2, seq_len=1024))
    orpo = estimate_memory(arch3b, Setup(terms=method_for("orpo").terms, micro_batch=2, seq_len=1024))
    assert "score head" in rm.details["logits/loss"] and rm.peak <= orpo.peak


def test_padded_methods_ignore_sft_packing_keys_and_kto_counts_a_pair_twice(tmp_path):
    """KTO, ORPO and reward models pad their rows: padding_free (an SFT key, auto by default) does not put
    them under varlen; and for KTO each preference row of the data is two examples."""
    import json

    from lmpipeline.methods.kto import KTOConfig
    from lmpipeline.methods.orpo import ORPOConfig
    from lmpipeline.plan.estimate import setup_from_stage
    from lmpipeline.plan.profile import profile_data

    rows = [{"prompt": "say a word", "chosen": "yes indeed", "rejected": "no"}] * 10
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for cls, kind in ((KTOConfig, "kto"), (ORPOConfig, "orpo")):
        stage = cls(output_dir=str(tmp_path), dataset_name_or_path=str(path), per_device_train_batch_size=2)
        setup = setup_from_stage(stage, method_for(kind), torch_dtype="bfloat16")
        assert setup.attn == "sdpa" and not setup.padding_free
    kto = KTOConfig(output_dir=str(tmp_path), dataset_name_or_path=str(path), per_device_train_batch_size=2)
    assert profile_data(kto, "unpaired").rows == 2 * profile_data(kto, "preference").rows
    assert len(profile_data(kto, "unpaired").lengths) == 20
