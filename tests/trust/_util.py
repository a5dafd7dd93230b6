"""Helpers shared by the trust tests: tiny configs, in-process runs, per-step losses.

Two kinds of model are used. The embedded tiny chat model (tests/conftest.py `tiny_model`) drives
the real pipeline through the CLI; an in-memory 1-layer Llama (`micro_llama`) drives the training
loop directly where a test only needs a loop (non-finite steps, spikes, checkpoints), in milliseconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

SFT_STAGE = {
    "max_samples": 48,
    "max_seq_length": 64,
    "max_steps": 6,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-3,
    "logging_steps": 1,
    "save_steps": 100,
    "assistant_only_loss": True,
    "seed": 7,
}


def write_config(folder: Path, model: Path, data: Path | str, *, stages=("sft",), extra_stage_configs=None,
                 **sft) -> Path:
    """A one-stage SFT config in `folder` (output in folder/run); `sft` overrides SFT_STAGE."""
    folder.mkdir(parents=True, exist_ok=True)
    stage = {"dataset_name_or_path": str(data), **SFT_STAGE, **sft}
    configs = {"sft": stage} if "sft" in stages else {}
    configs.update(extra_stage_configs or {})
    cfg = {"model_name_or_path": str(model), "output_dir": str(folder / "run"), "stages": list(stages),
           "stage_configs": configs}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def step_losses(run_dir: Path, stage: str = "sft") -> dict[int, float]:
    """{step: train loss} from <run>/<stage>/metrics.jsonl."""
    out = {}
    for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """lmpipeline's CLI in-process; returns (exit code, stdout + stderr)."""
    import logging

    from lmpipeline.cli import main

    # Log handlers are made once per process (the CLI's on the root logger, transformers' on its own), on
    # the sys.stderr of the test that came first; point them at this test's captured stderr (a closed
    # stream would print "Logging error").
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr  # not setStream(), which flushes the old, maybe closed, stream
            handler.__dict__.pop("flush", None)  # transformers binds flush to the stderr it first saw
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def subprocess_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmpipeline", *args]


# ------------------------------------------------------------------------------- in-memory loop


def micro_llama(seed: int = 0, vocab: int = 64):
    """A 1-layer, 16-wide Llama: a real transformers model that trains in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def synthetic_examples(n: int = 32, seed: int = 0, vocab: int = 64):
    """n token sequences (lengths 6..16), trained on every token after the first two, each with a file:line."""
    import random

    from lmpipeline.data.types import IGNORE_INDEX, Source, TokenizedExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(rng.randint(6, 16))]
        labels = [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]
        out.append(TokenizedExample(ids, labels, Source("synthetic.jsonl", i, i + 1)))
    return out


def loop_run(tmp_path: Path, *, objective=None, model=None, examples=None, resume=False, on_step_end=None, **cfg_kw):
    """Train `model` (default: micro_llama) with the real loop on synthetic examples.

    Returns (TrainResult, model). cfg_kw override an SFTConfig with full fine-tuning, 6 steps,
    2 x GA 2 run as configured, logging every step and no checkpoints.
    """
    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.data.build import SFTData, make_batch_plans
    from lmpipeline.data.types import DataReport
    from lmpipeline.methods.sft import SFTObjective
    from lmpipeline.train.loop import train
    from lmpipeline.train.runtime import make_accelerator

    # micro_batch_tokens off: helpers like Injecting count micro-batches as configured (GA per step).
    settings = dict(output_dir=str(tmp_path), use_lora=False, max_steps=6, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=1,
                    micro_batch_tokens=None)
    settings.update(cfg_kw)
    cfg = SFTConfig(**settings)
    model = model if model is not None else micro_llama()
    data = SFTData(train=examples or synthetic_examples(), eval=None, report=DataReport())
    train_plan, _ = make_batch_plans(cfg, data, SimpleNamespace(pad_token_id=0))
    accelerator = make_accelerator(cfg, tmp_path)
    result = train(model=model, cfg=cfg, objective=objective or SFTObjective(), train_plan=train_plan, eval_plan=None,
                   output_dir=tmp_path, accelerator=accelerator, resume=resume, on_step_end=on_step_end)
    return result, model


class Injecting:
    """SFTObjective whose loss is replaced by `value` (nan, inf, or a factor with scale=True) on chosen steps.

    Steps are optimizer steps (1-based); with GA > 1 only the first micro-batch of the step is hit.
    """

    def __init__(self, steps, value=float("nan"), *, ga: int = 2, scale: bool = False):
        from lmpipeline.methods.sft import SFTObjective

        self.inner = SFTObjective()
        self.steps = set(steps)
        self.value = value
        self.ga = ga
        self.scale = scale
        self.calls = 0

    def count(self, batch):
        return self.inner.count(batch)

    def loss(self, model, batch, total_units):
        loss, m = self.inner.loss(model, batch, total_units)
        step, micro = divmod(self.calls, self.ga)
        self.calls += 1
        if step + 1 in self.steps and micro == 0:
            loss = loss * self.value if self.scale else loss * 0 + self.value
            m = {**m, "loss": float(loss.detach()) * total_units}
        return loss, m


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------- inputs unchanged


def tree_hashes(*paths: Path) -> dict[str, str]:
    """{path: sha256} of every file under `paths` (files or folders): compare before and after a command
    to show that it left its inputs byte-identical."""
    import hashlib

    out = {}
    for top in map(Path, paths):
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def train_tiny_run(folder: Path, model: Path, data: Path, **sft) -> Path:
    """A finished 2-step LoRA SFT run in folder/run (checkpoint at each step); returns its config path."""
    from lmpipeline.cli import main

    cfg = write_config(folder, model, data, **{"max_steps": 2, "save_steps": 1, **sft})
    assert main(["run", str(cfg)]) == 0
    return cfg


def config_for_copy(trained: Path, run: Path, folder: Path, **sft) -> Path:
    """The config of the run `trained`, pointed at its copy `run` (written to folder/config.yaml)."""
    raw = yaml.safe_load((trained.parent / "config.yaml").read_text())
    raw["output_dir"] = str(run)
    raw["stage_configs"]["sft"].update(sft)
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def stopped_copy(trained: Path, folder: Path, **sft) -> tuple[Path, Path]:
    """A copy of the run `trained` in folder/run, recorded as stopped mid-stage (as a kill leaves it),
    and its config; `sft` changes the config and the recorded config alike (the run was made with it)."""
    import shutil

    run = folder / "run"
    shutil.copytree(trained, run)
    cfg = config_for_copy(trained, run, folder, **sft)
    record = json.loads((run / "run.json").read_text())
    record["stages"]["sft"]["status"] = "running"
    record["config"]["stage_configs"]["sft"].update(sft)
    (run / "run.json").write_text(json.dumps(record))
    return run, cfg
