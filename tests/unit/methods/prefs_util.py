"""Helpers shared by the KTO, ORPO and reward-model tests: a short training run through the shared loop,
held-out accuracy on the quickstart's preference pairs, and the TRL test hygiene."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipeline.config.schema import DPOConfig
from lmpipeline.data.preference import build_preference_data, collate_pairs


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spin-waiting makes
    # them much slower; one thread keeps each test at seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reset_accelerate():
    """transformers' Trainer leaves accelerate's process-wide state behind (TRL's default bf16 would make a
    later Accelerator autocast): give the next test a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def lora_on(model, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero LoRA B matrices: policy != reference, else every reward is 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def tiny_lora(tiny_model, cfg, *, auto_class=None, task_type: str = "CAUSAL_LM", **model_kwargs):
    from lmpipeline.methods.reference import disable_dropout
    from lmpipeline.models import loading

    model = loading.load_model(str(tiny_model), cfg, auto_class=auto_class, **model_kwargs)
    model = loading.apply_lora(model, cfg, task_type=task_type)
    disable_dropout(model)
    return model


def train_briefly(tiny_model, quickstart_data, cfg, *, build, plans, objective, model=None):
    """Train `objective` on `cfg`'s data with the shared loop; (model, tokenizer, step-0 eval, final eval)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from lmpipeline.train.loop import train
    from lmpipeline.train.runtime import make_accelerator, seed_everything

    seed_everything(cfg.seed)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = build(cfg, tok)
    model = model if model is not None else tiny_lora(tiny_model, cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, out)
    train_plan, eval_plan = plans(cfg, data, tok)
    result = train(model=model, cfg=cfg, objective=objective, train_plan=train_plan, eval_plan=eval_plan,
                   output_dir=out, accelerator=accelerator, tokenizer=tok)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if any(k.startswith("eval_") for k in line)]
    return accelerator.unwrap_model(model), tok, evals[0] if evals else {}, result.metrics


def quickstart_pairs(tok, quickstart_data, tmp_path, *, split: str = "eval", n: int = 150, max_seq_length: int = 128):
    cfg = DPOConfig(stage_name="pairs", output_dir=str(tmp_path), max_samples=n, max_seq_length=max_seq_length,
                    dataset_name_or_path=str(quickstart_data / f"dpo_{split}.jsonl"))
    return build_preference_data(cfg, tok).train


def heldout_pair_accuracy(model, tok, quickstart_data, tmp_path, objective, key: str = "rewards/accuracies",
                          batch_pairs: int = 50) -> float:
    """Mean of `objective`'s `key` metric over the quickstart's held-out pairs (dpo_eval.jsonl)."""
    pairs = quickstart_pairs(tok, quickstart_data, tmp_path)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_pairs):
            batch = collate_pairs(pairs[s:s + batch_pairs], tok.pad_token_id)
            _, m = objective.loss(model, batch, 1.0)
            total += float(m[key])
    model.train()
    return total / len(pairs)
