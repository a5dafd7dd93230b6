"""One benchmark setting in a fresh process (what `lmpipeline bench` runs per setting):

    python -m lmpipeline.bench.worker ENGINE KIND SETTING --model NAME --model-dir DIR [--lengths alpaca|long]
        [--steps 30] [--warmup 5] --result FILE

Writes the measure.run result as JSON to FILE; exit 0 on success. An out-of-memory error is a result
too (the setting does not fit), written with "error".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmpipeline.bench.worker")
    p.add_argument("engine", choices=["ours", "trl"])
    p.add_argument("kind", choices=["sft", "dpo"])
    p.add_argument("setting")
    p.add_argument("--model", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--lengths", default="alpaca")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--work", default="/tmp/lmpipeline-bench")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from lmpipeline.bench import measure

    try:
        res = measure.run(a.engine, a.kind, a.setting, a.model, Path(a.model_dir), a.lengths, a.steps, a.warmup,
                          Path(a.work))
        code = 0
    except torch.OutOfMemoryError as e:
        res = {"engine": a.engine, "kind": a.kind, "setting": a.setting, "model": a.model,
               "error": f"out of memory: {str(e).splitlines()[0]}"}
        code = 0
    except Exception as e:  # recorded, so one broken setting does not lose the others' results
        traceback.print_exc()
        res = {"engine": a.engine, "kind": a.kind, "setting": a.setting, "model": a.model,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        code = 1
    Path(a.result).write_text(json.dumps(res))
    return code


if __name__ == "__main__":
    sys.exit(main())
