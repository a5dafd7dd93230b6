"""`lmpipeline bench sft|dpo|generate`: ours and the peers side by side, one process per setting.

    lmpipeline bench sft --model llama-3.2-3b --ours packed,packed-ckpt --trl best [--lengths long]
        [--steps 30] [--warmup 5] [--model-dir DIR] [--results bench/results]
    lmpipeline bench generate --model llama-3.2-3b [--engines ours,hf-dynamic,hf-static]
        [--batch-sizes 1,32,256] [--prompt-tokens 128] [--new-tokens 256] [--temperature 1.0]

Builds the random-weight model once (lmpipeline/bench/workloads.py), runs every named setting in a fresh
`python -m lmpipeline.bench.worker` process (so peaks do not leak between settings), then writes all
results to <results>/<date>-<kind>-<model>-<lengths>.json and prints a table: tokens/s (pairs/s), peak
allocated memory, MFU against 790 TFLOP/s, the ratio to the first TRL setting, and whether the loss
curves agree (mean of the last 10 steps within 1% of TRL's). Settings: lmpipeline/bench/settings.py;
`--list` prints them. `generate` runs lmpipeline/bench/generation.py per path and batch size and
writes <results>/<date>-generate-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lmpipeline.errors import UserError

DEFAULT_RESULTS = Path("bench/results")


def _names(text: str | None) -> list[str]:
    return [n for n in (text or "").split(",") if n]


def _curve_agreement(ours: list[float], ref: list[float], tail: int = 10) -> float | None:
    """Relative difference of the mean loss over the last `tail` steps (None without both curves)."""
    if not ours or not ref:
        return None
    a, b = ours[-tail:], ref[-tail:]
    mb = sum(b) / len(b)
    return abs(sum(a) / len(a) - mb) / abs(mb) if mb else None


def format_table(results: list[dict]) -> str:
    kind = results[0]["kind"] if results else "sft"
    unit = "pairs/s" if kind == "dpo" else "tokens/s"
    ref = next((r for r in results if r.get("engine") == "trl" and "error" not in r), None)
    lines = [f"| engine | setting | {unit} | peak GiB | MFU | vs TRL {ref['setting'] if ref else '-'} | "
             "loss first / last-10 mean | curve vs TRL |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['setting']} | {r['error']} | | | | | |")
            continue
        speed = r["pairs_per_s"] if kind == "dpo" else r["tokens_per_s"]
        ref_speed = (ref["pairs_per_s"] if kind == "dpo" else ref["tokens_per_s"]) if ref else None
        ratio = f"{speed / ref_speed:.2f}x" if ref_speed else "-"
        losses = r.get("losses") or []
        tail = losses[-10:]
        loss = f"{losses[0]:.4f} / {sum(tail) / len(tail):.4f}" if losses else "-"
        agree = _curve_agreement(losses, ref.get("losses") if ref else [])
        fmt = f"{speed:,.2f}" if kind == "dpo" else f"{speed:,.0f}"
        lines.append(f"| {r['engine']} | {r['setting']} | {fmt} | {r['peak_alloc_gib']:.2f} | {r['mfu']:.1%} | {ratio} "
                     f"| {loss} | {'-' if agree is None else f'{agree:.2%}'} |")
    return "\n".join(lines)


def _check_model(name: str) -> None:
    from lmpipeline.bench import workloads

    if name not in workloads.ARCHITECTURES:
        raise UserError(f"unknown bench model `{name}`", key="--model",
                        hint=f"choose from {', '.join(sorted(workloads.ARCHITECTURES))}")


def _positive_ints(text: str, key: str) -> list[int]:
    try:
        values = [int(n) for n in _names(text)]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"`{text}` is not a comma-separated list of positive integers", key=key)
    return values


def generate_bench_command(args) -> int:
    """The engine and model.generate per batch size, each in a fresh worker process."""
    from lmpipeline.bench import generation, workloads

    _check_model(args.model)
    engines = _names(args.engines)
    unknown = [e for e in engines if e not in generation.ENGINES]
    if unknown or not engines:
        raise UserError(f"unknown generation path(s): {', '.join(unknown) or 'none given'}", key="--engines",
                        hint=f"choose from {', '.join(generation.ENGINES)}")
    batches = _positive_ints(args.batch_sizes, "--batch-sizes")
    model_dir = Path(args.model_dir or f"/tmp/lmpipeline-bench/{args.model}")
    print(f"model: random {args.model} in {model_dir}", flush=True)
    workloads.make_model(args.model, model_dir)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for batch in batches:
        for engine in engines:
            result_file = work / f"generate-{engine}-{batch}.json"
            cmd = [sys.executable, "-m", "lmpipeline.bench.generation", engine, "--model", args.model,
                   "--model-dir", str(model_dir), "--batch", str(batch), "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature),
                   "--result", str(result_file)]
            print(f"--- {engine} batch {batch}: {' '.join(cmd[1:])}", flush=True)
            result_file.unlink(missing_ok=True)
            proc = subprocess.run(cmd, env=os.environ.copy())
            res = json.loads(result_file.read_text()) if result_file.exists() else {
                "kind": "generate", "engine": engine, "batch": batch, "error": f"worker exited {proc.returncode}"}
            res["command"] = (f"lmpipeline bench generate --model {args.model} --engines {engine} --batch-sizes {batch} "
                              f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens} "
                              f"--temperature {args.temperature}")
            print(f"--- {engine} batch {batch}: " + json.dumps(res), flush=True)
            results.append(res)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y-%m-%d')}-generate-{args.model}{args.tag}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(generation.format_table(results))
    print(f"results: {path}")
    return 0


def bench_command(args) -> int:
    from lmpipeline.bench import settings, workloads

    if args.kind == "generate":
        return generate_bench_command(args)
    if args.list:
        for engine, table in settings.KINDS[args.kind].items():
            for name, (desc, _) in table.items():
                print(f"{engine:5} {name:20} {desc}")
        return 0
    _check_model(args.model)
    if args.lengths not in workloads.LENGTHS:
        raise UserError(f"unknown length distribution `{args.lengths}`", key="--lengths",
                        hint=f"choose from {', '.join(workloads.LENGTHS)}")
    runs = [("trl", n) for n in _names(args.trl)] + [("ours", n) for n in _names(args.ours)]
    if not runs:
        raise UserError("nothing to run", key="--ours/--trl", hint="name settings, e.g. --ours packed --trl best "
                        "(see --list)")
    for engine, name in runs:
        try:
            settings.lookup(args.kind, engine, name)
        except ValueError as e:
            raise UserError(str(e), key=f"--{engine}") from None
    model_dir = Path(args.model_dir or f"/tmp/lmpipeline-bench/{args.model}")
    print(f"model: random {args.model} in {model_dir}", flush=True)
    workloads.make_model(args.model, model_dir)
    results = []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for engine, name in runs:
        result_file = work / f"{engine}-{args.kind}-{name}.json"
        cmd = [sys.executable, "-m", "lmpipeline.bench.worker", engine, args.kind, name, "--model", args.model,
               "--model-dir", str(model_dir), "--lengths", args.lengths, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--work", str(work), "--result", str(result_file)]
        print(f"--- {engine} {args.kind} {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=os.environ.copy())
        if result_file.exists():
            res = json.loads(result_file.read_text())
        else:
            res = {"engine": engine, "kind": args.kind, "setting": name, "error": f"worker exited {proc.returncode}"}
        res["command"] = (f"lmpipeline bench {args.kind} --model {args.model} --lengths {args.lengths} "
                          f"--{engine} {name} --steps {args.steps} --warmup {args.warmup}")
        print(f"--- {engine} {name}: {time.time() - t0:.0f} s; " + json.dumps(
            {k: v for k, v in res.items() if k not in ("losses", "versions", "config")}), flush=True)
        results.append(res)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = args.lengths if args.kind == "sft" else "pairs"
    path = out_dir / f"{time.strftime('%Y-%m-%d')}-{args.kind}-{args.model}-{lengths}{args.tag}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"results: {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="throughput and memory, lmpipeline vs TRL / model.generate, on a random-weight model",
        description="Run named settings of lmpipeline (--ours) and TRL (--trl) on the same random-weight model, "
                    "data and seed, one process each (generate: the engine against model.generate); write "
                    "bench/results/*.json and print a table.")
    p.add_argument("kind", choices=["sft", "dpo", "generate"])
    p.add_argument("--model", default="llama-3.2-3b", help="llama-3.2-3b (default), llama-3.2-1b, llama-3.1-8b, qwen2.5-0.5b")
    p.add_argument("--lengths", default="alpaca", help="SFT length distribution: alpaca (default) or long")
    p.add_argument("--ours", help="comma-separated lmpipeline settings (see --list)")
    p.add_argument("--trl", help="comma-separated TRL settings (see --list)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per setting (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (default 5)")
    p.add_argument("--model-dir", help="where the random model is built (default /tmp/lmpipeline-bench/MODEL)")
    p.add_argument("--work", default="/tmp/lmpipeline-bench/work", help="scratch folder for the runs")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="folder for the results JSON")
    p.add_argument("--tag", default="", help="suffix for the results file name")
    p.add_argument("--list", action="store_true", help="print the settings of KIND and exit")
    g = p.add_argument_group("generate")
    g.add_argument("--engines", default="ours,hf-dynamic,hf-static",
                   help="generation paths to compare (default ours,hf-dynamic,hf-static)")
    g.add_argument("--batch-sizes", default="1,32,256", help="prompts per call (default 1,32,256)")
    g.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    g.add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    p.set_defaults(func=bench_command)
    return p
