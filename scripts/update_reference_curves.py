#!/usr/bin/env python
"""Regenerate the committed reference loss curves, tests/reference_curves/<name>.json.

    python scripts/update_reference_curves.py                 # all curves
    python scripts/update_reference_curves.py sft_lora dpo    # some of them
    LMPIPELINE_TEST_TINY_MODEL=/path/to/tiny-chat python scripts/update_reference_curves.py

Each curve is a short run of the embedded tiny chat model (lmpipeline/assets/tiny-chat) on the
quickstart data, through the CLI, on the CPU with one thread. The file stores the stage config, the
sha256 of the model weights, the loss at every step and the environment that produced them;
tests/trust/test_equivalence.py reruns the config and compares (max |delta| and drift).

A curve changes only for a reason: a deliberate change of the loss, masking, data order or the
tiny model, or a new torch/transformers/peft that moves the numbers beyond the test's tolerances.
Say which in the commit message that updates these files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "reference_curves"

_SFT = {
    "dataset_name_or_path": "examples/data/quickstart/sft_train.jsonl",
    "max_samples": 64,
    "max_seq_length": 128,
    "max_steps": 10,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "logging_steps": 1,
    "save_strategy": "no",
    "assistant_only_loss": True,
    "lora_dropout": 0.0,
    "seed": 7,
}
# name -> (stage kind, stage config). Paths are relative to the repository root.
CURVES: dict[str, tuple[str, dict]] = {
    "sft_lora": ("sft", {**_SFT, "learning_rate": 2e-3}),
    "sft_full": ("sft", {**_SFT, "use_lora": False, "learning_rate": 5e-4}),
    "dpo": ("dpo", {
        "dataset_name_or_path": "examples/data/quickstart/dpo_train.jsonl",
        "max_samples": 64,
        "max_seq_length": 128,
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "lora_dropout": 0.0,
        "seed": 7,
    }),
}
NOTE = ("Reference loss curve of a short tiny-model run, produced by scripts/update_reference_curves.py and "
        "checked by tests/trust/test_equivalence.py. Updating this file needs a reason in the commit message "
        "(a deliberate change of loss, masking, data order or the tiny model, or new library versions).")


def tiny_model_dir() -> Path:
    return Path(os.environ.get("LMPIPELINE_TEST_TINY_MODEL") or ROOT / "lmpipeline" / "assets" / "tiny-chat")


def weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def run_curve(kind: str, stage: dict, model_dir: Path, workdir: Path) -> dict[int, float]:
    """Run one curve's config through the CLI in `workdir`; {step: loss}."""
    import yaml

    from lmpipeline.cli import main

    stage = {**stage, "dataset_name_or_path": str(ROOT / stage["dataset_name_or_path"])}
    cfg = {"model_name_or_path": str(model_dir), "output_dir": str(workdir / "run"), "stages": [kind],
           "stage_configs": {kind: stage}}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    if code != 0:
        raise SystemExit(f"run of {kind} curve failed with exit code {code}")
    losses = {}
    for line in (workdir / "run" / kind / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[int(rec["step"])] = rec["loss"]
    return losses


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *CURVES], default=[], metavar="NAME",
                        help=f"curves to regenerate (default: all of {', '.join(CURVES)})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # the test runs with one thread too: same reduction order, same digits
    model_dir = tiny_model_dir()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(CURVES):
        kind, stage = CURVES[name]
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["LMPIPELINE_CACHE_DIR"] = str(Path(tmp) / "cache")
            losses = run_curve(kind, stage, model_dir, Path(tmp))
        record = {
            "about": NOTE,
            "name": name,
            "stage": kind,
            "config": stage,
            "model": "lmpipeline/assets/tiny-chat",
            "model_weights_sha256": weights_sha256(model_dir),
            "data_sha256": hashlib.sha256((ROOT / stage["dataset_name_or_path"]).read_bytes()).hexdigest(),
            "losses": {str(k): v for k, v in sorted(losses.items())},
            "environment": environment(),
            "created": _dt.date.today().isoformat(),
        }
        (OUT / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: {len(losses)} steps, loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
