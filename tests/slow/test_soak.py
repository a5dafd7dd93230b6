"""Soak: 2,000 tiny-model training steps with flat memory and steady throughput (pytest -m slow).

The real loop, data path and checkpointing (every 500 steps, keeping 2) on the embedded tiny chat
model: RSS is sampled every 100 steps, and so is throughput. After a 200-step warm-up (allocator
pools, first checkpoint) RSS must grow by less than 64 MB, and no 100-step window may run at less
than half the median speed. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

pytestmark = pytest.mark.slow

STEPS = 2000
EVERY = 100
MAX_RSS_GROWTH_MB = 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.timeout(1800)
def test_two_thousand_steps_flat_memory_steady_throughput(tmp_path, tiny_model, quickstart_data):
    from transformers import AutoTokenizer

    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.data.build import build_sft_data, make_batch_plans
    from lmpipeline.methods.sft import SFTObjective
    from lmpipeline.models import loading
    from lmpipeline.train.loop import train
    from lmpipeline.train.runtime import make_accelerator, seed_everything

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = SFTConfig(stage_name="sft", output_dir=str(tmp_path), dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"),
                    max_samples=512, max_seq_length=128, max_steps=STEPS, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, learning_rate=1e-3, assistant_only_loss=True, logging_steps=10,
                    save_steps=500, save_total_limit=2, packing=True, seed=3)
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = build_sft_data(cfg, tokenizer)
    model = loading.apply_lora(loading.load_model(str(tiny_model), cfg), cfg)
    accelerator = make_accelerator(cfg, tmp_path)
    plan, _ = make_batch_plans(cfg, data, tokenizer)

    samples = []  # (step, rss MB, seconds since the previous sample)
    last = [time.perf_counter()]

    def sample(step):
        if step % EVERY == 0:
            now = time.perf_counter()
            samples.append((step, _rss_mb(), now - last[0]))
            last[0] = now

    try:
        result = train(model=model, cfg=cfg, objective=SFTObjective(), train_plan=plan, eval_plan=None,
                       output_dir=tmp_path, accelerator=accelerator, tokenizer=tokenizer, on_step_end=sample)
    finally:
        torch.set_num_threads(threads)
    assert result.global_step == STEPS and "nonfinite_skipped_steps" not in result.metrics

    rss = {s: r for s, r, _ in samples}
    speeds = [EVERY / dt for s, _, dt in samples if s > EVERY]  # the first window holds start-up
    growth = rss[STEPS] - rss[2 * EVERY]
    median = statistics.median(speeds)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    report = {"steps": STEPS, "rss_mb": {s: round(r, 1) for s, r in rss.items()}, "rss_growth_mb_after_200": round(growth, 1),
              "steps_per_s_median": round(median, 2), "steps_per_s_min": round(min(speeds), 2),
              "steps_per_s_max": round(max(speeds), 2), "first_loss": losses[0], "last_loss": losses[-1],
              "checkpoints": sorted(p.name for p in (tmp_path / "checkpoints").iterdir())}
    print("\nsoak:", json.dumps(report, indent=1))
    assert growth < MAX_RSS_GROWTH_MB, report
    assert min(speeds) > 0.5 * median, report
    assert losses[-1] < losses[0]
    assert report["checkpoints"] == ["checkpoint-1000", "checkpoint-1500"]


@pytest.mark.timeout(600)
def test_a_valid_ten_megabyte_line_is_truncated_and_counted(tmp_path, tiny_model, capsys):
    """A 10 MB answer is read, tokenised (tens of seconds: linear, not a hang), truncated and counted."""
    from tests.trust._util import run_cli, write_config

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    huge = {"messages": [{"role": "user", "content": "Say it all."},
                         {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog " * 230_000}]}
    data = tmp_path / "huge.jsonl"
    data.write_text("\n".join([json.dumps(good)] * 3 + [json.dumps(huge)]) + "\n")
    assert data.stat().st_size > 10_000_000
    cfg = write_config(tmp_path, tiny_model, data, max_steps=1, max_samples=None)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    stats = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["sft"]["data"]
    assert stats["truncated"] == 1 and stats["train_examples"] == 4
