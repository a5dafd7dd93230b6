"""`lmpipeline merge PATH [--output DIR] [--dtype ...]`: merge LoRA adapter(s) into the base, save full weights.

For a run folder the adapter chain merged is the latest adapter stage's (e.g. sft -> dpo). A run whose
merge stage already merged that chain holds the merged model: without --output the command says where it
is and writes nothing (exit 0); with --output it merges the chain again there (e.g. in another dtype).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmpipeline.errors import UserError


def _adapter_stage(run, chosen: str | None):
    """(stage whose chain to merge, merge stage that already holds it or None) for a run. `chosen` is the
    stage asked for (--stage, or the stage folder given as PATH); None means the run's latest model."""
    stages = run.model_stages()
    if chosen is not None:
        info = run.stage(chosen)
        if info.kind != "merge":
            return info.name, None
        stages = stages[: stages.index(info) + 1] if info in stages else stages
    adapters = [s for s in stages if s.adapter]
    if not adapters:
        return chosen, None  # nothing to merge: merge_model explains (a full fine-tuning run)
    latest = adapters[-1]
    merged = [s for s in stages[stages.index(latest) + 1:] if s.kind == "merge"]
    return latest.name, (merged[-1] if merged else None)


def merge_command(path: str, output: str | None, *, dtype: str = "auto", base_model: str | None = None,
                  max_shard_size: str = "5GB", stage: str | None = None, overwrite: bool = False,
                  quantized_base: str = "original", device: str = "cpu", allow_pickle_weights: bool = False) -> int:
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.export.merge import merge_model

    p = Path(path)
    found = gen.find_run_dir(p) if p.exists() else None
    quant = {}
    if found is not None:
        run = gen.read_run(found[0])
        chosen = stage or (found[1] if found[1] in {s.name for s in run.stages} else None)
        name, already = _adapter_stage(run, chosen)
        spec = gen.resolve_in_run(run, name, base_model)
        if already is not None and output is None:
            print(f"{run.run_dir} already holds a merged model: {already.final_dir} "
                  f"({' -> '.join(spec.stage_names)} merged into {spec.base} by its `{already.name}` stage); "
                  "nothing written. To write another copy (e.g. --dtype float16), add --output DIR.")
            return 0
        quant = next((run.stage_config(s) for s in spec.stage_names if run.stage_config(s).get("use_4bit")), {})
    else:
        spec = gen.resolve_model(path, base_model)
    if output is None:
        raise UserError("where should the merged model go?", key="--output", hint="add --output DIR")
    result = merge_model(spec, output, dtype=dtype, max_shard_size=max_shard_size, quantized_base=quantized_base,
                         training_quant=quant, device=device, overwrite=overwrite,
                         allow_pickle_weights=allow_pickle_weights)
    print(f"merged {' -> '.join(spec.stage_names)} into {spec.base} ({result.dtype}): {result.output_dir}")
    for w in result.warnings:
        print(f"warning: {w}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lmpipeline.commands import add_allow_pickle_weights

    p = subparsers.add_parser("merge", help="merge LoRA adapters into the base model",
                              description="Merge the adapter chain of PATH (e.g. SFT then DPO) into the base "
                                          "and save safetensors, tokenizer and generation config.")
    p.add_argument("path", help="run folder, stage folder or adapter folder")
    p.add_argument("--output", metavar="DIR", help="folder for the merged model (required unless the run already "
                                                   "holds one: then its path is printed)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="merged weights dtype (auto: the base checkpoint's)")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="base to merge into, if not the recorded one")
    p.add_argument("--stage", help="merge the chain ending at this stage of a run (default: the latest)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--quantized-base", choices=("original", "dequantized"), default="original",
                   help="for QLoRA adapters: merge into original weights, or the 4-bit round trip (GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to merge (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_allow_pickle_weights(p)
    p.set_defaults(func=lambda a: merge_command(
        a.path, a.output, dtype=a.dtype, base_model=a.base_model, max_shard_size=a.max_shard_size, stage=a.stage,
        overwrite=a.overwrite, quantized_base=a.quantized_base, device=a.device,
        allow_pickle_weights=a.allow_pickle_weights))
    return p
