"""Where a decode step's GPU time goes: the engine's kernels at a few batch sizes (eager, so the profiler
sees every kernel; a CUDA graph replays the same ones). Run on the GPU machine:

    python3 bench/profile_generation.py --batch-sizes 1,256 --new-tokens 48
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lmpipeline.bench import workloads
from lmpipeline.bench.generation import prompt_rows
from lmpipeline.generation import GenerationEngine, Request, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-3b")
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    folder = workloads.make_model(args.model, tempfile.mkdtemp())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    for b in map(int, args.batch_sizes.split(",")):
        prompts = prompt_rows(args.model, b, 128, seed=1)
        reqs = [Request(q, SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)) for q in prompts]
        for graphs in (True, False):
            engine = GenerationEngine(model, None, max_slots=b, cuda_graphs=graphs)
            engine.generate(reqs)  # warm-up and capture
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(reqs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"batch {b} graphs={graphs}: {b * args.new_tokens / dt:,.0f} new tokens/s, "
                  f"{dt / args.new_tokens * 1e3:.2f} ms per token step (prefill included)")
        engine = GenerationEngine(model, None, max_slots=b, cuda_graphs=False)
        engine.generate(reqs)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(reqs)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
