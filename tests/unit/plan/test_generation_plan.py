"""The memory of a stage that generates: weights in the inference dtype plus the engine's buffers."""

from __future__ import annotations

import json

from lmpipeline.cli import main
from lmpipeline.config.presets import load_shipped
from lmpipeline.plan import hardware
from lmpipeline.plan.generation_plan import plan_generation


def test_the_kv_cache_is_counted_exactly_and_the_weights_in_bf16():
    arch = load_shipped("llama-3.2-3b")  # 28 layers, 8 KV heads of 128
    plan = plan_generation("eval", arch, slots=256, max_new_tokens=256, prompt_tokens=128)
    assert plan.max_len == 384
    assert plan.engine.kv_cache == 2 * 28 * 256 * 384 * 8 * 128 * 2  # keys and values, bf16
    assert plan.weights == arch.total_params * 2
    assert plan.peak == plan.weights + plan.engine.total
    # 256 slots of a 3B model fit an H200, not a T4
    assert plan_generation("eval", arch, slots=256, max_new_tokens=256, prompt_tokens=128,
                           device=hardware.gpu("h200-141gb")).fits
    assert not plan_generation("eval", arch, slots=256, max_new_tokens=2048, prompt_tokens=2048,
                               device=hardware.gpu("t4-16gb")).fits


def test_estimate_plans_the_eval_stage_of_the_quickstart(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert main(["estimate", "examples/quickstart.yaml", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    generation = [p for p in plans if p["kind"] == "generation"]
    assert [p["stage"] for p in generation] == ["eval"] and generation[0]["memory"]["parts_gib"]["kv cache"] >= 0
