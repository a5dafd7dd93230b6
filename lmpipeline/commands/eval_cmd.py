"""`lmpipeline eval PATH [--golden FILE] [--data FILE]`: compare base and tuned models on the same prompts.

PATH is a run folder (the base and every finished sft/dpo stage are compared), a stage folder, an
adapter or package folder (compared with its base), or a full model folder (compared with the base
its merge_info.json names, or --base-model).
Writes results.json and samples.jsonl to --output-dir (default: <run>/evaluation, or <PATH>-evaluation
beside a model folder) and prints the table and a few samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from lmpipeline import outputs
from lmpipeline.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")


def eval_command(path: str, *, golden: str | None = None, data: str | None = None, output_dir: str | None = None,
                 max_new_tokens: int = 256, batch_size: int = 8, max_samples: int | None = None,
                 compare_base: bool = True, base_model: str | None = None, dtype: str = "auto",
                 chat_template: str | None = None, num_print_samples: int = 3,
                 allow_pickle_weights: bool = False) -> int:
    from lmpipeline.config.lifecycle import EvalConfig
    from lmpipeline.context import RunContext, StageOutput
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.evaluate.stage import EvalStage

    if not golden and not data:
        raise UserError("give --golden FILE (prompts to generate for) and/or --data FILE (loss and perplexity)")
    p = Path(path)
    found = gen.find_run_dir(p) if p.exists() else None
    if found is not None and found[1] is None:
        run = gen.read_run(found[0])
        base = base_model or run.base_model
        completed = [StageOutput(s.name, s.kind, s.final_dir, s.adapter, s.entry.get("metrics") or {})
                     for s in run.model_stages()]
        run_dir = found[0]
        out = Path(output_dir) if output_dir else run_dir / "evaluation"
    else:
        spec = gen.resolve_model(path, base_model)
        names = spec.stage_names[-len(spec.adapters):] if spec.adapters else [spec.label]
        if spec.adapters:
            base = spec.base
            completed = [StageOutput(n, "adapter", a, True) for n, a in zip(names, spec.adapters)]
        else:
            # A merged model names its base in merge_info.json; any other full model needs --base-model.
            info = Path(spec.base) / "merge_info.json"
            merged_from = json.loads(info.read_text()).get("base_model") if info.is_file() else None
            base = base_model or merged_from or spec.base
            completed = [StageOutput(spec.label, "model", Path(spec.base), False)]
            compare_base = compare_base and (base_model or merged_from) is not None
        out = Path(output_dir) if output_dir else p.resolve().parent / f"{spec.label}-evaluation"
        run_dir = out  # no run.json there: the stage chains the entries above
    try:
        cfg = EvalConfig(stage_name="eval", output_dir=str(out), golden_set=golden, eval_dataset=data,
                         max_new_tokens=max_new_tokens, generation_batch_size=batch_size,
                         per_device_eval_batch_size=batch_size, max_samples=max_samples, compare_base=compare_base,
                         torch_dtype=dtype, chat_template=chat_template, num_print_samples=0,
                         allow_pickle_weights=allow_pickle_weights)
    except ValidationError as e:
        raise UserError(f"invalid option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    outputs.check_is_folder(out, key="--output-dir")
    ctx = RunContext(run_dir=Path(run_dir), base_model=base, completed=completed)
    stage = EvalStage(cfg)
    result = stage.execute(ctx)

    from lmpipeline.evaluate.stage import RESULTS_FILE, SAMPLES_FILE

    # The stage has logged the results table already: printing it again would show it twice.
    samples_path = result.output_dir / SAMPLES_FILE
    if samples_path.is_file() and num_print_samples:
        for line in samples_path.read_text().splitlines()[:num_print_samples]:
            s = json.loads(line)
            print(f"--- {s['source']}\nprompt:    {s['prompt_text'][:300]}")
            if s.get("reference") is not None:
                print(f"reference: {s['reference'][:300]}")
            for label, text in s["outputs"].items():
                print(f"{label + ':':<10} {text[:300]}")
    print(f"results: {result.output_dir / RESULTS_FILE}" + (f"; samples: {samples_path}" if samples_path.is_file() else ""))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lmpipeline.commands import add_allow_pickle_weights, positive_int

    p = subparsers.add_parser(
        "eval", help="evaluate base vs tuned models: loss, perplexity, generation metrics",
        description="Compare the base model and the trained stages of PATH on the same data and prompts: "
                    "loss and perplexity, greedy generations with exact match, ROUGE-L and BLEU.")
    p.add_argument("path", help="run folder, stage folder, adapter folder or model folder")
    p.add_argument("--golden", metavar="FILE", help='prompts JSONL: {"prompt": ..., "reference": ...} or any SFT format')
    p.add_argument("--data", metavar="FILE", help="data for loss and perplexity (any SFT format)")
    p.add_argument("--output-dir", metavar="DIR", help="where results.json and samples.jsonl go")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N", help="longest answer (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="prompts per generation batch (default 8)")
    p.add_argument("--max-samples", type=positive_int, metavar="N", help="use the first N golden prompts")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the untrained base")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="base model, if not the one recorded (e.g. a local copy)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: bf16 on GPU, else float32)")
    p.add_argument("--chat-template", metavar="NAME_OR_JINJA", help="template for every model (default: the tuned model's)")
    add_allow_pickle_weights(p)
    p.set_defaults(func=lambda a: eval_command(
        a.path, golden=a.golden, data=a.data, output_dir=a.output_dir, max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size, max_samples=a.max_samples, compare_base=not a.no_base, base_model=a.base_model,
        dtype=a.dtype, chat_template=a.chat_template, allow_pickle_weights=a.allow_pickle_weights))
    return p
