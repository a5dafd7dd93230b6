"""The training loop shared by every method. It reads top to bottom:

    for each optimizer step:
        take the next gradient_accumulation_steps micro-batches of this epoch (this rank's share)
        count the units the loss is normalised by over the WHOLE global batch (all ranks, all micro-batches)
        forward + backward each micro-batch, its loss already divided by that global count
        clip, step, schedule; log, evaluate, checkpoint at the configured steps

Normalising by the global count (trained tokens for SFT, pairs for DPO) makes micro-batch x GA equal
one big batch, which the naive mean-of-means does not (the gradient-accumulation bug of trl #2175).

A method plugs in an Objective: count(batch) -> units, loss(model, batch, total_units) ->
(loss, metric sums). Batches come from a BatchPlan: a deterministic micro-batch order per epoch
(seed + epoch), so a resumed run sees exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.errors import NonFiniteLossError, UserError
from lmpipeline.train import checkpoint as ckpt_io
from lmpipeline.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Exit code of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: try again).
PREEMPTED_EXIT_CODE = 75


class Objective(Protocol):
    def count(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict, total_units: float) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class BatchPlan:
    """Micro-batches of example indices for each epoch, and how to turn indices into tensors."""

    epoch_batches: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], dict]
    describe: Callable[[list[int]], list[str]] = lambda idx: [str(i) for i in idx]


@dataclass
class TrainResult:
    global_step: int
    metrics: dict = field(default_factory=dict)
    stopped_early: bool = False


class Preempted(UserError):
    exit_code = PREEMPTED_EXIT_CODE


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return int(batch.get("num_tokens", 0))


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step or eval) plus the configured trackers."""

    def __init__(self, path: Path, accelerator, is_main: bool):
        self.path = path
        self.accelerator = accelerator
        self.is_main = is_main
        if is_main:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])


def _autocast(cfg: TrainStageConfig, device: torch.device):
    if cfg.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


class _StopSignal:
    """SIGTERM/SIGUSR1 ask for a checkpoint at the next step boundary (SLURM preemption)."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        log.warning("signal %s received: saving a checkpoint at the end of this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate(model, objective: Objective, plan: BatchPlan, cfg: TrainStageConfig, device, accelerator) -> dict:
    """Metric sums over the whole eval set divided by its units; loss also as perplexity."""
    model.eval()
    sums: dict[str, float] = {}
    units = 0.0
    with torch.no_grad():
        for idx in plan.epoch_batches(0):
            batch = _to_device(plan.collate(idx), device)
            with _autocast(cfg, device):
                _, m = objective.loss(model, batch, 1.0)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    units = sums.pop("units", 0.0)
    if accelerator is not None and accelerator.num_processes > 1:
        t = torch.tensor([units] + [sums[k] for k in sorted(sums)], device=device, dtype=torch.float64)
        t = accelerator.reduce(t, reduction="sum")
        units, vals = float(t[0]), t[1:].tolist()
        sums = dict(zip(sorted(sums), vals))
    out = {f"eval_{k}": v / max(units, 1.0) for k, v in sums.items()}
    if "eval_loss" in out:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


def train(
    *,
    model,
    cfg: TrainStageConfig,
    objective: Objective,
    train_plan: BatchPlan,
    eval_plan: BatchPlan | None,
    output_dir: Path,
    accelerator,
    tokenizer=None,
    resume: bool = False,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    ga = cfg.gradient_accumulation_steps

    micro_per_epoch = len(train_plan.epoch_batches(0))
    if micro_per_epoch == 0:
        raise UserError("no training batches: the dataset is empty after filtering", key="dataset_name_or_path")
    per_step = ga * world
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / per_step))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))

    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    scaler = torch.amp.GradScaler(device.type) if cfg.fp16 and device.type == "cuda" else None

    ckpt_dir = output_dir / "checkpoints"
    metrics = MetricsWriter(output_dir / "metrics.jsonl", accelerator, is_main)
    state = {"global_step": 0, "best_eval_loss": None, "evals_without_improvement": 0}
    if resume:
        last = ckpt_io.latest_checkpoint(ckpt_dir)
        if last is not None:
            state.update(ckpt_io.load_checkpoint(last, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler))
            log.info("resumed from %s at step %d", last, state["global_step"])
            if is_main:
                # Lines after the checkpoint came from the interrupted run; the resumed run rewrites them.
                _truncate_metrics(output_dir / "metrics.jsonl", state["global_step"])
        else:
            log.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)

    model.train()
    if state["global_step"] == 0 and eval_plan is not None:
        ev = evaluate(model, objective, eval_plan, cfg, device, accelerator)
        metrics.write({"step": 0, **ev})
        log.info("step 0 (before training): %s", _fmt(ev))

    window = {"sums": {}, "tokens": 0, "t0": time.perf_counter(), "steps": 0}
    last_grad_norm = float("nan")
    last_eval: tuple[int, dict] | None = None
    result = TrainResult(global_step=state["global_step"])
    progress = _progress(total_steps, state["global_step"], is_main)

    with _StopSignal() as stop:
        while state["global_step"] < total_steps:
            step = state["global_step"]
            epoch, pos = divmod(step, steps_per_epoch)
            batches = train_plan.epoch_batches(epoch)
            step_micro = batches[pos * per_step:(pos + 1) * per_step]
            mine = step_micro[rank::world]
            collated = [_to_device(train_plan.collate(idx), device) for idx in mine]

            units = torch.tensor(float(sum(objective.count(b) for b in collated)), device=device)
            if world > 1:
                units = accelerator.reduce(units, reduction="sum")
            total_units = max(float(units), 1.0)

            step_sums: dict[str, float] = {}
            for i, batch in enumerate(collated):
                sync = i == len(collated) - 1
                ctx = nullcontext() if sync or world == 1 else accelerator.no_sync(model)
                with ctx:
                    with _autocast(cfg, device):
                        loss, m = objective.loss(model, batch, total_units)
                    if not torch.isfinite(loss):
                        _raise_nonfinite(output_dir, step + 1, mine[i], train_plan, is_main)
                    # DDP averages gradients over ranks; the loss is already normalised globally.
                    scaled = loss * world
                    if scaler is not None:
                        scaler.scale(scaled).backward()
                    else:
                        accelerator.backward(scaled)
                for k, v in m.items():
                    step_sums[k] = step_sums.get(k, 0.0) + float(v)
                window["tokens"] += _real_tokens(batch)

            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                last_grad_norm = float(gn)
                if not math.isfinite(last_grad_norm):
                    _raise_nonfinite(output_dir, step + 1, [i for b in mine for i in b], train_plan, is_main, what="gradient norm")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state["global_step"] = step = step + 1
            if world > 1:
                keys = sorted(step_sums)
                t = accelerator.reduce(torch.tensor([step_sums[k] for k in keys], device=device, dtype=torch.float64), reduction="sum")
                step_sums = dict(zip(keys, t.tolist()))
            for k, v in step_sums.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            window["steps"] += 1
            if progress is not None:
                progress.update(1)

            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                u = max(window["sums"].get("units", 0.0), 1.0)
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
                rec.update({k: v / u for k, v in window["sums"].items() if k != "units"})
                rec.update({
                    "learning_rate": lr,
                    "grad_norm": last_grad_norm,
                    "tokens_per_second": window["tokens"] * world / elapsed,
                    "peak_memory_gb": round(_peak_memory_gb(device), 3),
                })
                metrics.write(rec)
                if is_main:
                    log.info("step %d/%d %s", step, total_steps, _fmt(rec, skip=("step",)))
                window = {"sums": {}, "tokens": 0, "t0": time.perf_counter(), "steps": 0}

            at_epoch_end = step % steps_per_epoch == 0
            do_eval = eval_plan is not None and (
                (cfg.eval_strategy == "steps" and cfg.eval_steps and step % cfg.eval_steps == 0)
                or (cfg.eval_strategy == "epoch" and at_epoch_end)
            )
            if do_eval:
                ev = evaluate(model, objective, eval_plan, cfg, device, accelerator)
                last_eval = (step, ev)
                metrics.write({"step": step, **ev})
                if is_main:
                    log.info("eval at step %d: %s", step, _fmt(ev))
                if _early_stop(state, ev, cfg):
                    result.stopped_early = True
            do_save = cfg.save_strategy != "no" and (
                (cfg.save_strategy == "steps" and step % cfg.save_steps == 0)
                or (cfg.save_strategy == "epoch" and at_epoch_end)
            )
            if (do_save or stop.received is not None) and step < total_steps:
                _save(accelerator, model, optimizer, scheduler, state, ckpt_dir, step, tokenizer, cfg)
            if on_step_end is not None:
                on_step_end(step)
            if stop.received is not None:
                if progress is not None:
                    progress.close()
                raise Preempted(f"stopped by signal {stop.received} after step {step}; checkpoint saved",
                                hint="run again with --resume to continue from it")
            if result.stopped_early:
                log.info("early stopping at step %d: eval loss did not improve for %d evaluations",
                         step, cfg.early_stopping_patience)
                break
    if progress is not None:
        progress.close()

    if eval_plan is not None:
        # The last step may just have been evaluated; evaluating again would only repeat it.
        if last_eval is None or last_eval[0] != state["global_step"]:
            ev = evaluate(model, objective, eval_plan, cfg, device, accelerator)
            metrics.write({"step": state["global_step"], "final": True, **ev})
        else:
            ev = last_eval[1]
        result.metrics.update(ev)
        if is_main:
            log.info("final eval: %s", _fmt(ev))
    result.global_step = state["global_step"]
    return result


def _save(accelerator, model, optimizer, scheduler, state, ckpt_dir, step, tokenizer, cfg):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt_io.save_checkpoint(ckpt_dir, step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                scheduler=scheduler, trainer_state=dict(state), tokenizer=tokenizer)
        ckpt_io.rotate_checkpoints(ckpt_dir, cfg.save_total_limit)
    accelerator.wait_for_everyone()


def _early_stop(state: dict, ev: dict, cfg: TrainStageConfig) -> bool:
    if not cfg.early_stopping_patience or "eval_loss" not in ev:
        return False
    best = state["best_eval_loss"]
    if best is None or ev["eval_loss"] < best - cfg.early_stopping_threshold:
        state["best_eval_loss"] = ev["eval_loss"]
        state["evals_without_improvement"] = 0
        return False
    state["evals_without_improvement"] += 1
    return state["evals_without_improvement"] >= cfg.early_stopping_patience


def _raise_nonfinite(output_dir: Path, step: int, indices: list[int], plan: BatchPlan, is_main: bool, what: str = "loss"):
    ids = plan.describe(indices)
    dump = output_dir / f"nonfinite_step{step}.json"
    if is_main:
        dump.write_text(json.dumps({"step": step, "what": what, "examples": ids}, indent=2))
    raise NonFiniteLossError(
        f"non-finite {what} at step {step}; the batch's examples are listed in {dump} (first: {', '.join(ids[:3])})",
        hint="lower learning_rate, check those rows, or use bf16 instead of fp16",
    )


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _fmt(rec: dict, skip=()) -> str:
    parts = []
    for k, v in rec.items():
        if k in skip:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _progress(total: int, start: int, is_main: bool):
    """A tqdm bar on a terminal; log lines alone when output goes to a file or CI."""
    if not is_main or not sys.stderr.isatty() or os.environ.get("LMPIPELINE_NO_PROGRESS"):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
