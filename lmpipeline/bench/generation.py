"""`lmpipeline bench generate`: the engine against model.generate on the same model, prompts and seed.

Paths ("engines"):
    ours        lmpipeline.generation.GenerationEngine (static cache, CUDA-graph decode on a GPU)
    hf-dynamic  model.generate with transformers' dynamic cache (what lmpipeline used before the engine)
    hf-static   model.generate with cache_implementation="static" (transformers compiles the forward)

Workload: `batch` prompts of `prompt_tokens` random word ids (workloads.py's tokenizer: one token a
word), `new_tokens` new tokens each, sampled at `temperature` (0: greedy). No eos ends a sample early
(ours: no eos ids; transformers: min_new_tokens), so every path generates batch x new_tokens tokens.

Figures per path and batch size, each path in a fresh process (worker: `python -m
lmpipeline.bench.generation`), so one path's memory and compiled graphs never show in another's:
    setup_seconds           the first full call (capture of the CUDA graphs, or torch.compile, plus
                            one run), reported separately from the timed figures
    capture_seconds         ours: the graph capture alone
    new_tokens_per_s        batch x new_tokens over the wall time of the second identical call
    time_to_first_token_s   a call with one new token (prefill and the first token), after warm-up
    peak_alloc_gib          torch.cuda.max_memory_allocated over the timed call (NaN on the CPU)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from lmpipeline.bench import workloads

ENGINES = ("ours", "hf-dynamic", "hf-static")


def prompt_rows(name: str, batch: int, prompt_tokens: int, *, seed: int = 0) -> list[list[int]]:
    sp = workloads.specials(name)
    rng = np.random.default_rng(seed)
    return [[sp.bos] + rng.integers(workloads.FIRST_WORD_ID, workloads.word_limit(sp), prompt_tokens - 1).tolist()
            for _ in range(batch)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _ours(model, prompts, new_tokens: int, temperature: float):
    from lmpipeline.generation import GenerationEngine, Request, SamplingParams

    engine = GenerationEngine(model, None, max_slots=len(prompts))

    def call(n: int):
        params = SamplingParams(temperature=temperature, max_new_tokens=n, seed=0)
        out = engine.generate([Request(p, params) for p in prompts])
        return sum(len(c.token_ids) for (c,) in out)

    return call, engine


def _hf(model, prompts, new_tokens: int, temperature: float, static: bool):
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    mask = torch.ones_like(ids)

    def call(n: int):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=temperature > 0,
                               pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id,
                               **({"temperature": temperature, "top_k": None, "top_p": None} if temperature > 0 else {}),
                               **({"cache_implementation": "static"} if static else {}))
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    return call, None


def run(engine: str, model_name: str, model_dir: Path, *, batch: int, prompt_tokens: int, new_tokens: int,
        temperature: float) -> dict:
    from transformers import AutoModelForCausalLM

    if engine not in ENGINES:
        raise ValueError(f"unknown generation path {engine!r}; choose from {', '.join(ENGINES)}")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if cuda else "cpu").eval()
    prompts = prompt_rows(model_name, batch, prompt_tokens)
    if engine == "ours":
        call, eng = _ours(model, prompts, new_tokens, temperature)
    else:
        call, eng = _hf(model, prompts, new_tokens, temperature, static=engine == "hf-static")
    setup = _timed(lambda: call(new_tokens))
    _timed(lambda: call(1))  # warm the one-token shape too (a static cache recompiles per length)
    first_token = _timed(lambda: call(1))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counted = {}
    seconds = _timed(lambda: counted.setdefault("tokens", call(new_tokens)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"kind": "generate", "engine": engine, "model": model_name, "batch": batch, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "temperature": temperature, "dtype": str(dtype).removeprefix("torch."),
            "generated_tokens": counted["tokens"], "seconds": round(seconds, 4),
            "new_tokens_per_s": counted["tokens"] / seconds, "time_to_first_token_s": round(first_token, 4),
            "setup_seconds": round(setup, 3),
            "capture_seconds": round(eng.stats.get("capture_seconds", 0.0), 3) if eng is not None else None,
            "peak_alloc_gib": round(peak, 3), "device": torch.cuda.get_device_name() if cuda else "cpu"}


def format_table(results: list[dict]) -> str:
    lines = ["| path | batch | new tokens/s | vs hf-static | first token s | setup s (capture) | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    static = {r["batch"]: r["new_tokens_per_s"] for r in results if r.get("engine") == "hf-static" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['batch']} | {r['error']} | | | | |")
            continue
        ratio = f"{r['new_tokens_per_s'] / static[r['batch']]:.2f}x" if r["batch"] in static else "-"
        capture = f" ({r['capture_seconds']:.1f})" if r.get("capture_seconds") is not None else ""
        lines.append(f"| {r['engine']} | {r['batch']} | {r['new_tokens_per_s']:,.0f} | {ratio} | "
                     f"{r['time_to_first_token_s']:.3f} | {r['setup_seconds']:.1f}{capture} | {r['peak_alloc_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One path and batch size in this process; the result (or the error) as JSON to --result."""
    p = argparse.ArgumentParser(prog="python -m lmpipeline.bench.generation")
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("--model", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        res = run(a.engine, a.model, Path(a.model_dir), batch=a.batch, prompt_tokens=a.prompt_tokens,
                  new_tokens=a.new_tokens, temperature=a.temperature)
    except torch.OutOfMemoryError as e:
        res = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # recorded, so one failing path does not lose the others' results
        traceback.print_exc()
        res, code = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}, 1
    if "error" in res:
        res.update(kind="generate", engine=a.engine, model=a.model, batch=a.batch)
    Path(a.result).write_text(json.dumps(res))
    return code


if __name__ == "__main__":
    sys.exit(main())
