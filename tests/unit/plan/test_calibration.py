"""The estimator against measured GPU peaks (torch.cuda.max_memory_allocated), within 15%.

Measured on the device tool's H100 (GUIDE section 5; raw rows in ../shared/bench/h100_*_results.jsonl):
random-init Llama-3.2-3B, LoRA r16 on all 7 projections, adamw_8bit, batch 2 x GA 4 unless stated; SFT
rows are alpaca-like (lognormal, median 200 tokens, sigma 0.7, clipped 16..2048, 3,000 rows, seed 0), DPO
pairs UltraFeedback-like (prompt median 150, answers median 220, each clipped 8..512, max length 1024).
These are TRL 1.15 runs, estimated with impl="trl" (fused LM head, bf16 embeddings under 4-bit).
The last rows are lmpipeline's own DPO stage on the same bench (methods/dpo.py docstring), impl="lmpipeline".
"""

import numpy as np
import pytest

from lmpipeline.methods import method_for
from lmpipeline.plan.estimate import GIB, Setup, TokenProfile, estimate_memory
from lmpipeline.config.presets import load_shipped

# A DPO stage's Setup: its method's estimator terms and the reference a LoRA DPO config runs with.
DPO = dict(terms=method_for("dpo").terms, reference="adapter_disabled")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft_bench_profile() -> TokenProfile:
    # ../shared/bench/sft_anchor_bench.py: dataset(3000), numpy default_rng(0)
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(200), 0.7, 3000).astype(int), 16, 2048)
    return TokenProfile(rows=3000, lengths=lens.tolist(), source="bench")


def dpo_bench_profile() -> TokenProfile:
    # ../shared/bench/dpo_anchor_bench.py: dataset(25 * 8 + 64); a row is prompt + answer, one token a word
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(25 * 8 + 64):
        p = int(np.clip(rng.lognormal(np.log(150), 0.7), 8, 512))
        c = int(np.clip(rng.lognormal(np.log(220), 0.7), 8, 512))
        r = int(np.clip(rng.lognormal(np.log(220), 0.7), 8, 512))
        rows.append(p + max(c, r))
    return TokenProfile(rows=len(rows), lengths=rows, source="bench")


BASE = dict(micro_batch=2, grad_accum=4, seq_len=2048, gradient_checkpointing=True, lora_r=16, lora_targets=TARGETS,
            lora_dropout=0.0, optim="adamw_8bit", impl="trl")
# (name, measured GiB, setup changes, profile, rows drawn: SFT 60 steps x 8 rows unpacked, 30 x 8 packed;
#  DPO 25 steps x 8 pairs)
CASES = [
    ("TRL QLoRA NF4, padded, checkpointing", 3.39, dict(quant="4bit"), "sft", 480),
    ("TRL bf16 LoRA, padded, checkpointing", 7.58, dict(), "sft", 480),
    ("TRL bf16 LoRA, packed 2 x 2048, checkpointing", 7.87, dict(packing=True), "sft", 240),
    ("TRL + Liger, packed 2 x 2048, checkpointing", 7.71, dict(packing=True, liger=True), "sft", 240),
    ("TRL + Liger, packed 2 x 2048, no checkpointing", 20.70,
     dict(packing=True, liger=True, gradient_checkpointing=False), "sft", 240),
    ("TRL + Liger, packed 8 x 2048, checkpointing", 12.48,
     dict(packing=True, liger=True, micro_batch=8, grad_accum=1), "sft", 240),
    ("TRL DPO QLoRA, <= 1024, checkpointing", 3.46, dict(DPO, quant="4bit", seq_len=1024), "dpo", 200),
    ("TRL DPO bf16 LoRA, <= 1024, checkpointing", 7.69, dict(DPO, seq_len=1024), "dpo", 200),
]

# lmpipeline's own SFT stage, `lmpipeline bench sft` on the H100 (bench/README.md "Memory estimates",
# bench/results/2026-11-23-sft-*-memory.json and -llama-3.1-8b-alpaca.json): varlen attention, LoRA input
# casts off, chunked loss; (name, architecture, measured GiB, setup changes, rows drawn).
OURS = dict(BASE, impl="lmpipeline")
OURS_CASES = [
    ("3B bf16 LoRA, packed, varlen, no checkpointing", "llama-3.2-3b", 21.25,
     dict(packing=True, attn="varlen", gradient_checkpointing=False), 80),
    ("3B bf16 LoRA, packed, varlen, checkpointing", "llama-3.2-3b", 8.03, dict(packing=True, attn="varlen"), 80),
    # H100 2026-11-23, compiled layers (`torch_compile`)
    ("3B bf16 LoRA, packed, compiled, no checkpointing", "llama-3.2-3b", 17.93,
     dict(packing=True, attn="varlen", gradient_checkpointing=False, compiled=True), 96),
    ("3B bf16 LoRA, packed 4 x 2048, compiled, no checkpointing", "llama-3.2-3b", 28.54,
     dict(packing=True, attn="varlen", micro_batch=4, grad_accum=2, gradient_checkpointing=False, compiled=True), 96),
    # H200 2026-12-02 (bench/results/2026-12-02-*.json), after the frozen-head loss change. The H100's QLoRA
    # peaks (3.68 GiB 3B, 8.25 8B) are gone: they measured peft's fp32 upcast at load time, which
    # prepare_kbit_model no longer does. Neither QLoRA row of 12-02 is kept either: the loss set their peak,
    # and its chunk has since halved (methods/logprobs.LOGIT_CHUNK_ELEMENTS 2^26 -> 2^25).
    # H200 2026-12-03 (calls 7 and 8): QLoRA after both changes.
    ("8B QLoRA NF4, padded, checkpointing (H200 call 7)", "llama-3.1-8b", 6.94, dict(quant="4bit"), 64),
    ("3B QLoRA NF4, padding-free, compiled, checkpointing (H200 call 8)", "llama-3.2-3b", 2.91,
     dict(quant="4bit", padding_free=True, attn="varlen", compiled=True), 80),
    ("3B bf16 LoRA, packed 4 x 2048, compiled, a quarter of the layers checkpointed (H200)", "llama-3.2-3b", 23.40,
     dict(packing=True, attn="varlen", micro_batch=4, grad_accum=2, checkpoint_fraction=0.25, compiled=True), 80),
    ("3B bf16 LoRA, packed 4 x 2048, compiled, Liger loss, no checkpointing (H200)", "llama-3.2-3b", 28.02,
     dict(packing=True, attn="varlen", micro_batch=4, grad_accum=2, gradient_checkpointing=False, liger=True,
          compiled=True), 80),
    ("3B bf16 LoRA, packed, compiled, Liger loss, checkpointing (H200, lean)", "llama-3.2-3b", 7.62,
     dict(packing=True, attn="varlen", liger=True, compiled=True), 80),
]


@pytest.mark.parametrize("name, arch, measured, changes, seen", OURS_CASES, ids=[c[0] for c in OURS_CASES])
def test_our_stage_estimates_within_15_percent(name, arch, measured, changes, seen):
    est = estimate_memory(load_shipped(arch), Setup(**{**OURS, **changes}), sft_bench_profile(), rows_seen=seen)
    assert est.peak / GIB == pytest.approx(measured, rel=0.15), f"{name}: {est.peak / GIB:.2f} GiB vs {measured}"


# lmpipeline's DPO stage, `lmpipeline bench dpo` (H200 2026-12-03, call 9): pairs packed end to end
# (varlen), reference log-probs precomputed, QLoRA NF4; (name, measured GiB, setup changes, pairs drawn).
OURS_DPO = dict(OURS, terms=DPO["terms"], quant="4bit", seq_len=1024, attn="varlen", padding_free=True,
                reference="precomputed")
OURS_DPO_CASES = [
    ("DPO 3B QLoRA, 4 pairs x GA 2, checkpointing", 3.91, dict(micro_batch=4, grad_accum=2), 64),
    ("DPO 3B QLoRA, 2 pairs x GA 4, checkpointing, compiled", 3.41, dict(compiled=True), 64),
]


@pytest.mark.parametrize("name, measured, changes, seen", OURS_DPO_CASES, ids=[c[0] for c in OURS_DPO_CASES])
def test_our_dpo_stage_estimates_within_15_percent(name, measured, changes, seen):
    est = estimate_memory(load_shipped("llama-3.2-3b"), Setup(**{**OURS_DPO, **changes}), dpo_bench_profile(),
                          rows_seen=seen)
    assert est.peak / GIB == pytest.approx(measured, rel=0.15), f"{name}: {est.peak / GIB:.2f} GiB vs {measured}"


def test_the_estimator_counts_the_chunk_the_loss_uses():
    from lmpipeline.methods.logprobs import LOGIT_CHUNK_ELEMENTS
    from lmpipeline.plan.estimate import OURS_LOSS_CHUNK_ELEMENTS

    assert OURS_LOSS_CHUNK_ELEMENTS == LOGIT_CHUNK_ELEMENTS


def estimate_case(changes, data, seen):
    arch = load_shipped("llama-3.2-3b")
    profile = sft_bench_profile() if data == "sft" else dpo_bench_profile()
    return estimate_memory(arch, Setup(**{**BASE, **changes}), profile, rows_seen=seen)


@pytest.mark.parametrize("name, measured, changes, data, seen", CASES, ids=[c[0] for c in CASES])
def test_estimate_within_15_percent_of_measured_peak(name, measured, changes, data, seen):
    est = estimate_case(changes, data, seen)
    assert est.peak / GIB == pytest.approx(measured, rel=0.15), f"{name}: {est.peak / GIB:.2f} GiB vs {measured}"


def test_the_guide_settings_are_within_5_percent_except_trl_dpo_qlora():
    """Tighter than the acceptance bound, to catch drift: every case but TRL's DPO QLoRA is within 5%
    (that one is 12% high: TRL's QLoRA peaks sit ~0.3 GiB below its bf16 peaks beyond the weights)."""
    for name, measured, changes, data, seen in CASES:
        err = estimate_case(changes, data, seen).peak / GIB / measured - 1
        limit = 0.15 if name == "TRL DPO QLoRA, <= 1024, checkpointing" else 0.05
        assert abs(err) < limit, (name, err)


# Throughput of the same runs (tokens/s, H100): the time model within 40% (its docstring says +-50%).
TIME_CASES = [
    ("packed, checkpointing", 8099, dict(packing=True)),
    ("packed, no checkpointing, Liger", 12459, dict(packing=True, liger=True, gradient_checkpointing=False)),
    ("padded, checkpointing", 749, dict()),
    ("QLoRA padded, checkpointing", 666, dict(quant="4bit")),
]


@pytest.mark.parametrize("name, measured, changes", TIME_CASES, ids=[c[0] for c in TIME_CASES])
def test_time_model_against_bench_throughput(name, measured, changes):
    from lmpipeline.plan import hardware
    from lmpipeline.plan.timing import estimate_time

    t = estimate_time(load_shipped("llama-3.2-3b"), Setup(**{**BASE, **changes}), hardware.gpu("h100-80gb"),
                      sft_bench_profile())
    assert t.tokens_per_second == pytest.approx(measured, rel=0.4), name


# A run measured with a real tokenizer, real rows and a 152k vocabulary (tests/gpu/test_seed000_gpu.py on
# the H200; bench/README.md, "Memory estimate calibration"): the 3B QLoRA config as written, bf16,
# rows end to end (varlen), no checkpointing.
QWEN_ALPACA_MEASURED_GIB = 11.99


def test_a_real_tokenizer_and_data_run_is_estimated_within_15_percent_and_headroom_stays_above(
        tmp_path, repo_root, shared_data, capsys, monkeypatch):
    import json
    import shutil

    from lmpipeline.cli import main

    model = tmp_path / "qwen2.5-3b"
    shutil.copytree(shared_data / "tokenizers" / "qwen2.5-0.5b-instruct", model)
    shutil.copy(repo_root / "lmpipeline" / "config" / "model_configs" / "qwen2.5-3b" / "config.json", model / "config.json")
    monkeypatch.chdir(repo_root)
    assert main(["estimate", "examples/seed000_config.yaml", "--gpu", "h200-141gb", "--json", "--set", f"model.name={model}",
                 "--set", f"dataset.path={shared_data / 'sft_alpaca' / 'llamafactory_alpaca_en_demo.json'}"]) == 0
    memory = json.loads(capsys.readouterr().out)[0]["memory"]
    assert memory["peak_gib"] == pytest.approx(QWEN_ALPACA_MEASURED_GIB, rel=0.15)
    assert memory["required_gib"] >= QWEN_ALPACA_MEASURED_GIB  # "with headroom" is an upper bound
