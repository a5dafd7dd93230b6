"""Where a training step's GPU time goes: the CUDA kernels of a few micro-batches of our SFT stage,
by total time (torch.profiler), on the bench model and data.

    python3 bench/profile_step.py SETTING [--model llama-3.2-3b] [--micro 4] [--cpu]

SETTING is an `lmpipeline bench sft --list` name of ours. Runs the stage for 3 steps to warm up (and
compile), then profiles `--micro` more micro-batches through the same objective and model. Prints
the top kernels and the share of time in matmuls, attention, the loss and everything else.
"""

import argparse
import logging
import time
from pathlib import Path

import torch

from lmpipeline.bench import measure, settings, workloads
from lmpipeline.config.schema import SFTConfig
from lmpipeline.data.build import SFTData, make_batch_plans
from lmpipeline.data.types import DataReport, TokenizedExample
from lmpipeline.methods.sft import SFTStage
from lmpipeline.train.loop import _to_device, autocast_for


def count_graph_breaks() -> int:
    """Graph breaks dynamo recorded so far: each one splits a compiled layer into more, smaller graphs."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("setting")
    p.add_argument("--model", default="llama-3.2-3b")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--cpu", action="store_true", help="also record host-side ops and list them by self CPU time")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_dir = workloads.make_model(a.model, Path(f"/tmp/lmpipeline-bench/{a.model}"))
    _, extra = settings.lookup("sft", "ours", a.setting)
    cfg = SFTConfig(stage_name="sft", output_dir="/tmp/profile-run", max_steps=3, logging_steps=1, save_strategy="no",
                    max_seq_length=2048, **measure.for_this_machine({**settings.SFT_COMMON, **extra}))
    rows = workloads.sft_rows(a.model, "alpaca")[: a.rows * 10]
    data = SFTData([TokenizedExample(r, list(r)) for r in rows], None, DataReport())
    stage = SFTStage(cfg)
    stage.execute(model_name_or_path=str(model_dir), torch_dtype="bfloat16", data=data)
    model = stage.model
    # The stage switched attention and compilation back when it finished: redo both for the profile.
    from lmpipeline.models import attention
    from lmpipeline.models.compile import compile_decoder_layers
    from lmpipeline.methods.sft import SFTObjective
    from lmpipeline.methods.logprobs import fused_head_usable

    packed = cfg.packing or cfg.padding_free
    impl = attention.attention_for(model, requested=cfg.attn_implementation, packed=packed,
                                   max_seq_length=cfg.max_seq_length)
    if impl:
        attention.switch(model, impl)
    if cfg.torch_compile:
        compile_decoder_layers(model)
    model.train()
    objective = SFTObjective(fused=cfg.chunked_loss and not cfg.use_liger_kernel and fused_head_usable(model))
    plan, _ = make_batch_plans(cfg, data, stage.tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of this script
    batches = [_to_device(plan.collate(idx), device) for idx in plan.epoch_batches(0)[: a.micro + 2]]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU

    def micro(batch):
        with autocast_for(cfg, device):
            loss, _ = objective.loss(model, batch, float(objective.count(batch)))
        loss.backward()

    for b in batches[:2]:
        micro(b)
    sync()
    # Wall time of the same micro-batches without the profiler: against the kernel time below it says
    # whether the step waits on the GPU or on the host (Python, kernel launches).
    started = time.perf_counter()
    for b in batches[2:]:
        micro(b)
    sync()
    wall = time.perf_counter() - started
    activities = [activity] + ([torch.profiler.ProfilerActivity.CPU] if a.cpu and device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches[2:]:
            micro(b)
        sync()
    events = prof.key_averages()
    # Self time: with --cpu, host ops also carry their kernels' time as (non-self) device time.
    timed = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(timed(e) for e in events)
    groups = {"matmul (gemm)": ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul"), "attention": ("flash", "fmha", "attention"),
              "loss / softmax": ("cross_entropy", "log_softmax", "logsumexp", "liger"), }
    share = {g: 0.0 for g in groups}
    share["other"] = 0.0
    for e in events:
        name = e.key.lower()
        g = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
        share[g] += timed(e)
    tokens = sum(int(b["input_ids"].numel()) for b in batches[2:])
    print(f"{a.setting}: {a.micro} micro-batches, {tokens} tokens, GPU time {total / 1e3:.1f} ms "
          f"({tokens / (total / 1e6):,.0f} tokens/s of kernel time); wall {wall * 1e3:.1f} ms "
          f"({tokens / wall:,.0f} tokens/s), {count_graph_breaks()} graph breaks under torch.compile")
    from torch._dynamo.utils import counters

    for reason, n in counters["graph_break"].most_common(5):
        print(f"  graph break x{n}: {reason[:200]}")
    for g, t in share.items():
        print(f"  {g:<16}{t / 1e3:9.1f} ms  {t / total:6.1%}")
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
    if a.cpu and device.type == "cuda":  # where the host's time goes (Python-level ops included)
        print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
