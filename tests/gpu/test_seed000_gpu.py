"""The QLoRA SFT config of a 3B model on alpaca (examples/seed000_config.yaml) as its author wrote it, on
the GPU: no precision and no checkpointing named, so the library chooses both (bf16: auto,
gradient_checkpointing: auto), and the memory estimate it logs is compared with the measured peak.

The model is a random-weight Qwen2.5-3B (lmpipeline/config/model_configs/qwen2.5-3b) with the real
Qwen2.5 tokenizer and the shared alpaca rows (../shared/data; on the GPU machine a carried copy named by
LMPIPELINE_SHARED_DIR). Run there with -s: the printed lines go into bench/README.md.

    python3 -m pytest -m gpu tests/gpu/test_seed000_gpu.py -q -s
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmpipeline.cli import main

pytestmark = pytest.mark.gpu

CAP_GIB = 8.0  # the small GPU the config's author had in mind
WARMUP_STEPS = 3  # steps left out of the speed figure (kernel choices, allocator growth)


@pytest.fixture(scope="module")
def random_qwen_3b(tmp_path_factory, repo_root, shared_data) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("qwen2.5-3b-random")
    config = AutoConfig.from_pretrained(repo_root / "lmpipeline" / "config" / "model_configs" / "qwen2.5-3b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for f in (shared_data / "tokenizers" / "qwen2.5-0.5b-instruct").iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    torch.cuda.empty_cache()
    return folder


def _run(tmp_path: Path, model: Path, shared_data: Path, repo_root: Path) -> tuple[dict, list[dict]]:
    out = tmp_path / "run"
    args = ["run", str(repo_root / "examples" / "seed000_config.yaml"), "--set", f"model.name={model}",
            "--set", f"dataset.path={shared_data / 'sft_alpaca' / 'llamafactory_alpaca_en_demo.json'}",
            "--set", f"training.output_dir={out}"]
    torch.cuda.reset_peak_memory_stats()
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    return record, [m for m in metrics if "tokens_per_second" in m]


def _report(label: str, record: dict, steps: list[dict]) -> dict:
    entry = record["stages"]["sft"]
    derived = {k.split(".")[-1]: v for k, v in record.get("derived", {}).items() if k.startswith("stage_configs.sft.")}
    timed = [m for m in steps if m["step"] > WARMUP_STEPS]
    tokens = sum(m["tokens"] for m in timed)
    seconds = sum(m["tokens"] / m["tokens_per_second"] for m in timed)
    peak = max(m["peak_memory_gib"] for m in steps)
    estimate = entry.get("estimate", {}).get("memory", {})
    figures = {"tokens_per_second": tokens / seconds, "peak_gib": peak, "estimate_peak_gib": estimate.get("peak_gib"),
               "estimate_required_gib": estimate.get("required_gib"), "derived": derived}
    print(f"\n{label}: {figures['tokens_per_second']:,.0f} tokens/s over steps {WARMUP_STEPS + 1}-{steps[-1]['step']}, "
          f"peak {peak:.2f} GiB allocated; estimate {figures['estimate_peak_gib']} GiB peak, "
          f"{figures['estimate_required_gib']} GiB with headroom; chose {derived}")
    return figures


def test_the_config_as_written_trains_in_bf16_with_the_librarys_choices(tmp_path, random_qwen_3b, shared_data, repo_root):
    record, steps = _run(tmp_path, random_qwen_3b, shared_data, repo_root)
    figures = _report("seed000 config, whole H200", record, steps)
    assert figures["derived"].get("bf16") is True  # an H200 has bf16 tensor cores
    assert figures["estimate_required_gib"] >= figures["peak_gib"]  # "with headroom" stays an upper bound


def test_the_config_as_written_fits_an_8_gib_gpu(tmp_path, random_qwen_3b, shared_data, repo_root):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(CAP_GIB / total)
    try:
        record, steps = _run(tmp_path, random_qwen_3b, shared_data, repo_root)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    figures = _report(f"seed000 config, capped to {CAP_GIB:g} GiB", record, steps)
    assert figures["peak_gib"] <= CAP_GIB
    assert figures["derived"].get("gradient_checkpointing") is True  # the whole-GPU choice would not fit
