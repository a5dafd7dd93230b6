"""`lmpipeline generate PATH --prompts in.jsonl --output out.jsonl`: batch inference.

Each input row (any shape read_prompts accepts: {"prompt": str | messages}, or an SFT format) is
written back with "output", "num_tokens" and "finished" (False when cut at --max-new-tokens). Greedy
unless --temperature > 0 (then --top-p, --top-k and --seed apply); --stop ends an answer at a string.
Generation runs on lmpipeline's engine with --batch-size slots. The output file is written whole at
the end (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lmpipeline import outputs
from lmpipeline.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")


def generate_command(path: str, prompts: str, output: str, *, max_new_tokens: int = 256, batch_size: int = 8,
                     base_model: str | None = None, dtype: str = "auto", chat_template: str | None = None,
                     system: str | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, stop: list[str] | None = None, max_samples: int | None = None,
                     allow_pickle_weights: bool = False) -> int:
    from lmpipeline.evaluate import generation as gen

    out = Path(output)
    if out.resolve() == Path(prompts).resolve():
        raise UserError("--output would overwrite --prompts; choose another file")
    outputs.check_is_file_target(out, key="--output")
    if out.exists():  # a new file beside a model is fine; replacing one of its files is not
        outputs.check_disjoint(out, {"PATH": path}, output_key="--output", what="output file")
    rows = gen.read_prompts(prompts, max_samples=max_samples, system_prompt=system, key="--prompts")
    model, tokenizer = gen.load_for_inference(path, base_model, dtype, allow_pickle_weights=allow_pickle_weights)
    template = gen.resolve_template(tokenizer, chat_template=chat_template)
    t0 = time.perf_counter()
    results = gen.generate_batch(model, tokenizer, [r.prompt for r in rows], chat_template=template,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p,
                                 top_k=top_k, stop=stop or (), seed=seed)
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.unique_temp(out)
    with open(tmp, "w", encoding="utf-8") as f:
        for r, g in zip(rows, results):
            rec = dict(r.row)
            rec.update({"output": g.text, "num_tokens": g.num_tokens, "finished": g.finished})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    tokens = sum(g.num_tokens for g in results)
    cut = sum(not g.finished for g in results)
    print(f"generated {len(results)} answer(s), {tokens:,} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):,.0f} tokens/s){f'; {cut} cut at --max-new-tokens' if cut else ''}")
    print(f"written: {out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lmpipeline.commands import add_allow_pickle_weights, non_negative_int, positive_int, probability, temperature

    p = subparsers.add_parser("generate", help="batch inference over a prompts file",
                              description="Generate an answer for every prompt of a JSONL file.")
    p.add_argument("path", help="run folder, stage folder, adapter folder, package folder or model folder")
    p.add_argument("--prompts", required=True, metavar="FILE", help='JSONL of {"prompt": str or messages} (or an SFT format)')
    p.add_argument("--output", required=True, metavar="FILE", help="JSONL written with an `output` per row")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N", help="longest answer (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="prompts generated at once (engine slots, default 8)")
    p.add_argument("--max-samples", type=positive_int, metavar="N", help="only the first N prompts")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling threshold when sampling")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the K most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end an answer at this string (repeatable)")
    p.add_argument("--system", metavar="TEXT", help="system prompt put before prompts that have none")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="base model for an adapter, if not the recorded one")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: bf16 on GPU, else float32)")
    p.add_argument("--chat-template", metavar="NAME_OR_JINJA", help="override the tokenizer's chat template")
    add_allow_pickle_weights(p)
    p.set_defaults(func=lambda a: generate_command(
        a.path, a.prompts, a.output, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
        base_model=a.base_model, dtype=a.dtype, chat_template=a.chat_template, system=a.system,
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=a.stop,
        max_samples=a.max_samples,
        allow_pickle_weights=a.allow_pickle_weights))
    return p
