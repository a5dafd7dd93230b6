"""`lmpipeline merge PATH --output DIR [--dtype ...]`: merge LoRA adapter(s) into the base, save full weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def merge_command(path: str, output: str, *, dtype: str = "auto", base_model: str | None = None,
                  max_shard_size: str = "5GB", stage: str | None = None, overwrite: bool = False,
                  quantized_base: str = "original", device: str = "cpu", allow_pickle_weights: bool = False) -> int:
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.export.merge import merge_model

    p = Path(path)
    found = gen.find_run_dir(p) if p.exists() else None
    quant = {}
    if found is not None:
        run = gen.read_run(found[0])
        spec = gen.resolve_in_run(run, stage or found[1], base_model)
        quant = next((run.stage_config(s) for s in spec.stage_names if run.stage_config(s).get("use_4bit")), {})
    else:
        spec = gen.resolve_model(path, base_model)
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
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the merged model")
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
