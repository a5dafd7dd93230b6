"""The training loop shared by every method. It reads top to bottom:

    for each optimizer step:
        take the next gradient_accumulation_steps micro-batches of this epoch (this rank's share;
            with micro_batch_tokens the step's rows are first regrouped into fewer, token-bounded ones)
        count the units the loss is normalised by over the WHOLE global batch (all ranks, all micro-batches)
        forward + backward each micro-batch, its loss already divided by that global count
        clip, step, schedule; log, evaluate, checkpoint at the configured steps

Normalising by the global count (trained tokens for SFT, pairs for DPO) makes micro-batch x GA equal
one big batch, which the naive mean-of-means does not (the gradient-accumulation bug of trl #2175).

Several processes (accelerate launch / torchrun): rank r trains micro-batches r, r+world, ... of the
step, so N processes x GA equals 1 process x N*GA. A stop signal on any rank stops every rank after
the same step (the flag rides on the per-step metrics all-reduce), so the checkpoint is consistent
and no rank is left waiting in a collective. Each rank beats a heartbeat (lmpipeline/train/heartbeat.py)
so that a stall names the rank the others wait for.

A NaN/inf loss or gradient norm stops the run (on_nonfinite: error) naming the step and dumping the
batch's row sources to output_dir/nonfinite_stepN.json; with on_nonfinite: skip that optimizer step
is dropped (no update, no scheduler step), logged and counted, up to max_nonfinite_skips. A loss
above loss_spike_factor x the median of the recent steps is logged as a spike. The first Ctrl-C
saves a checkpoint at the end of the step and exits 130; a second one stops at once.

A method plugs in an Objective: count(batch) -> units, loss(model, batch, total_units) ->
(loss, metric sums); optionally finalize_metrics(record) -> record, called on every logged train and
eval record, for metrics that are not one sum per unit (KTO's per-class means: a ratio of two sums).
Batches come from a BatchPlan (lmpipeline/data/batch_plan.py): a deterministic
micro-batch order per epoch (seed + epoch), so a resumed run sees exactly the data the uninterrupted
run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import statistics
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.errors import NonFiniteLossError, UserError
from lmpipeline.numbers import fmt_pairs
from lmpipeline.train import sharded
from lmpipeline.train.heartbeat import Heartbeat
from lmpipeline.train import checkpoint as ckpt_io
from lmpipeline.train.optim import build_optimizer, build_scheduler, planned_steps
from lmpipeline.train.runtime import collective_timeout_s, is_sharded

log = logging.getLogger(__name__)

# Exit code of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: try again).
PREEMPTED_EXIT_CODE = 75
# Exit code of a run stopped by Ctrl-C after writing a checkpoint (128 + SIGINT, the shell's convention).
INTERRUPTED_EXIT_CODE = 130
# Loss-spike watchdog: compare each step's loss with the median of this many recent steps, once at
# least SPIKE_WARMUP of them are known (the first steps of a run fall fast and would look like dips,
# never spikes, but a median of two or three steps is too noisy to judge anything by).
SPIKE_WINDOW = 50
SPIKE_WARMUP = 10


class Objective(Protocol):
    def count(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict, total_units: float) -> tuple[torch.Tensor, dict[str, float]]: ...


def finalized(objective: Objective, record: dict) -> dict:
    """The record after the objective's optional finalize_metrics (every sum is already divided by the
    record's units, so a ratio of two logged values is the ratio of their sums)."""
    hook = getattr(objective, "finalize_metrics", None)
    return hook(record) if hook is not None else record


class MicroBatches(Protocol):
    """What the loop reads its data from (built by the data layer: lmpipeline/data/batch_plan.BatchPlan)."""

    regroup: Callable[..., list[list[int]]] | None

    def epoch_batches(self, epoch: int) -> list[list[int]]: ...

    def step_batches(self, epoch: int, pos: int, per_step: int, world: int = 1) -> list[list[int]]: ...

    def collate(self, indices: list[int]) -> dict: ...

    def describe(self, indices: list[int]) -> list[str]: ...


@dataclass
class TrainResult:
    global_step: int
    metrics: dict = field(default_factory=dict)
    stopped_early: bool = False


class Preempted(UserError):
    exit_code = PREEMPTED_EXIT_CODE


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return int(batch.get("num_tokens", 0))


def _read_step_values(sums: dict, finite: list[torch.Tensor], device) -> tuple[dict[str, float], list[bool]]:
    """The step's metric sums and finite-loss flags as Python values, in one device-to-host copy."""
    keys = list(sums)
    values = [sums[k] if torch.is_tensor(sums[k]) else torch.tensor(float(sums[k])) for k in keys] + finite
    if not values:
        return {}, []
    host = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values]).tolist()
    return dict(zip(keys, host[:len(keys)])), [bool(x) for x in host[len(keys):]]


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


def autocast_for(cfg: TrainStageConfig, device: torch.device):
    if cfg.bf16 is True:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


class _StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption) and a first Ctrl-C (SIGINT) ask for a checkpoint at the next
    step boundary and a clean stop; a second Ctrl-C interrupts at once (KeyboardInterrupt), leaving the
    last complete checkpoint as the one --resume continues from."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step
        self.received = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                        "(press Ctrl-C again to stop at once and keep the previous checkpoint)")
        else:
            log.warning("signal %s received: saving a checkpoint at the end of this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate(model, objective: Objective, plan: MicroBatches, cfg: TrainStageConfig, device, accelerator) -> dict:
    """Metric sums over the whole eval set divided by its units; loss also as perplexity."""
    model.eval()
    sums: dict[str, float] = {}
    units = 0.0
    batches = plan.epoch_batches(0)
    with torch.no_grad():
        for idx in batches:
            batch = _to_device(plan.collate(idx), device)
            with autocast_for(cfg, device):
                _, m = objective.loss(model, batch, 1.0)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        # Forwards whose metrics are dropped, so that every rank runs as many as the busiest one
        # (sharded models all-gather weights in each) and knows the metric names for the all-reduce.
        for _ in range(_padding_forwards(accelerator, len(batches), device)):
            with autocast_for(cfg, device):
                _, m = objective.loss(model, _to_device(plan.collate(batches[0] if batches else [0]), device), 1.0)
            for k in m:
                sums.setdefault(k, 0.0)
    model.train()
    units = sums.pop("units", 0.0)
    if accelerator is not None and accelerator.num_processes > 1:
        t = torch.tensor([units] + [sums[k] for k in sorted(sums)], device=device, dtype=torch.float64)
        t = accelerator.reduce(t, reduction="sum")
        units, vals = float(t[0]), t[1:].tolist()
        sums = dict(zip(sorted(sums), vals))
    out = {f"eval_{k}": v / max(units, 1.0) for k, v in sums.items()}
    # Perplexity is exp(token cross-entropy): meaningful for SFT's loss, not for a preference loss.
    if "eval_loss" in out and getattr(objective, "reports_perplexity", False):
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return finalized(objective, out)


def _padding_forwards(accelerator, mine: int, device) -> int:
    if accelerator is None or accelerator.num_processes == 1:
        return 0
    most = int(accelerator.gather(torch.tensor([mine], device=device)).max())
    return most - mine if is_sharded(accelerator) else int(mine == 0)


def train(
    *,
    model,
    cfg: TrainStageConfig,
    objective: Objective,
    train_plan: MicroBatches,
    eval_plan: MicroBatches | None,
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
    steps_per_epoch, total_steps = planned_steps(cfg, micro_per_epoch, world)

    # micro_batch_tokens: say what regrouping does to the first steps (nothing to say for one micro-batch
    # per step that no step splits).
    regrouping = False
    if train_plan.regroup is not None:
        sample = [len(train_plan.step_batches(0, pos, per_step, world)) for pos in range(min(steps_per_epoch, 50))]
        regrouping = per_step > 1 or any(n != per_step for n in sample)
        if regrouping and is_main:
            log.info("micro_batch_tokens: each step's %d micro-batches run as %.2f on average (%d-%d, first %d "
                     "steps)", per_step, sum(sample) / len(sample), min(sample), max(sample), len(sample))
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    scaler = torch.amp.GradScaler(device.type) if cfg.fp16 and device.type == "cuda" else None

    ckpt_dir = output_dir / "checkpoints"
    metrics = MetricsWriter(output_dir / "metrics.jsonl", accelerator, is_main)
    state = {"global_step": 0, "best_eval_loss": None, "evals_without_improvement": 0, "nonfinite_skips": 0}
    if resume:
        if is_main:
            ckpt_io.remove_partial(ckpt_dir)  # a save killed half-way: never a checkpoint, only clutter
        last = ckpt_io.latest_checkpoint(ckpt_dir)
        if last is not None:
            # FSDP2: rank 0 reads full tensors and every rank takes its shard (a collective).
            load = sharded.load_checkpoint if sharded.is_fsdp(accelerator) else ckpt_io.load_checkpoint
            state.update(load(last, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler))
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
        log.info("step 0 (before training): %s", fmt_pairs(ev))

    window = {"sums": {}, "tokens": 0, "micro": 0, "t0": time.perf_counter(), "steps": 0}
    last_grad_norm = float("nan")
    last_eval: tuple[int, dict] | None = None
    recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
    loss_spikes = 0
    result = TrainResult(global_step=state["global_step"])
    progress = _progress(total_steps, state["global_step"], is_main)

    # DeepSpeed steps inside backward at the boundary we mark, and divides each loss by its GA itself.
    deepspeed = getattr(accelerator.distributed_type, "value", "") == "DEEPSPEED"
    if deepspeed and (cfg.save_strategy != "no" or resume):
        raise UserError("checkpoints of DeepSpeed ZeRO runs are not supported yet", key="save_strategy",
                        hint="use --strategy fsdp2 (sharded and resumable), or save_strategy: no (a stopped run starts over)")
    with _StopSignal() as stop, Heartbeat(output_dir / "heartbeat", rank, world,
                                          stall_warn_s=collective_timeout_s() / 2) as hb:
        while state["global_step"] < total_steps:
            step = state["global_step"]
            epoch, pos = divmod(step, steps_per_epoch)
            mine = train_plan.step_batches(epoch, pos, per_step, world)[rank::world]
            hb.beat(step + 1, "data")
            # Counted on the host before the copy: no device sync between steps for the counts.
            on_host = [train_plan.collate(idx) for idx in mine]
            units = torch.tensor(float(sum(objective.count(b) for b in on_host)), device=device)
            window["tokens"] += sum(_real_tokens(b) for b in on_host)
            window["micro"] += len(mine)
            collated = [_to_device(b, device) for b in on_host]
            hb.beat(step + 1, "sync: token count")
            if world > 1:
                units = accelerator.reduce(units, reduction="sum")
            total_units = max(float(units), 1.0)

            step_sums: dict[str, float | torch.Tensor] = {}
            finite: list[torch.Tensor] = []  # per micro-batch: was its loss finite (read once, after the loop)
            for i, batch in enumerate(collated):
                sync = i == len(collated) - 1
                if deepspeed:
                    accelerator.gradient_state._set_sync_gradients(sync)
                ctx = nullcontext() if sync or world == 1 else accelerator.no_sync(model)
                with ctx:
                    hb.beat(step + 1, "forward", micro=i)
                    with autocast_for(cfg, device):
                        loss, m = objective.loss(model, batch, total_units)
                    # DDP averages gradients over ranks; the loss is already normalised globally.
                    scaled = loss * world * (ga if deepspeed else 1)
                    if deepspeed:  # DeepSpeed steps inside backward: there is no step left to drop
                        if not torch.isfinite(loss):
                            _raise_nonfinite(output_dir, step + 1, mine[i], train_plan, rank)
                    else:
                        # A non-finite loss still runs backward, with NaN gradients: they reach every rank
                        # through the gradient all-reduce, so all ranks see a non-finite gradient norm
                        # below and stop or skip the same step (no rank is left waiting in a collective).
                        # A multiply rather than an `if`: reading the flag here would make the host wait
                        # for the forward before it can queue the backward, every micro-batch.
                        finite.append(torch.isfinite(loss.detach()))
                        scaled = scaled * torch.where(finite[-1], 1.0, float("nan"))
                    hb.beat(step + 1, "backward", micro=i)  # the last one waits in DDP's gradient all-reduce
                    if scaler is not None:
                        scaler.scale(scaled).backward()
                    else:
                        accelerator.backward(scaled)
                for k, v in m.items():  # device tensors stay on the device until the step ends
                    step_sums[k] = step_sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)

            step_sums, finite_flags = _read_step_values(step_sums, finite, device)
            nonfinite_idx = [i for ok, idx in zip(finite_flags, mine) if not ok for i in idx]

            hb.beat(step + 1, "optimizer")
            if scaler is not None:
                scaler.unscale_(optimizer)
            # accelerate's clip knows sharded (FSDP2 DTensor) gradients; DeepSpeed clips itself and reports.
            # max_norm=inf when clipping is off: the norm is still needed to catch non-finite gradients.
            gn = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                             cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            last_grad_norm = float(gn) if gn is not None else float("nan")
            # With fp16 the GradScaler drops steps with inf/NaN gradients itself and lowers its scale.
            bad_grad = gn is not None and scaler is None and not math.isfinite(last_grad_norm)
            lr = scheduler.get_last_lr()[0]
            skipped = bool(nonfinite_idx) or bad_grad
            if skipped:
                what = "loss" if nonfinite_idx else "gradient norm"
                where = nonfinite_idx or [i for b in mine for i in b]
                state["nonfinite_skips"] += 1
                if cfg.on_nonfinite == "error" or state["nonfinite_skips"] > cfg.max_nonfinite_skips:
                    _raise_nonfinite(output_dir, step + 1, where, train_plan, rank, what=what,
                                     skipped=state["nonfinite_skips"] - 1 if cfg.on_nonfinite == "skip" else None)
                # on_nonfinite: skip drops this optimizer step: no update, no scheduler step.
                dump = _dump_nonfinite(output_dir, step + 1, where, train_plan, rank, what)
                log.warning("non-finite %s at step %d: step skipped (%d of at most %d); its examples are in %s",
                            what, step + 1, state["nonfinite_skips"], cfg.max_nonfinite_skips, dump)
                metrics.write({"step": step + 1, "skipped_nonfinite": what, "nonfinite_skips": state["nonfinite_skips"]})
                if scaler is not None:
                    scaler.update()
            elif scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if not skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state["global_step"] = step = step + 1
            stop_now = stop.received is not None
            if world > 1:
                hb.beat(step, "sync: metrics")
                keys = sorted(step_sums)
                t = accelerator.reduce(torch.tensor([step_sums[k] for k in keys] + [float(stop_now)], device=device,
                                                    dtype=torch.float64), reduction="sum")
                *vals, stops = t.tolist()
                step_sums = dict(zip(keys, vals))
                stop_now = stops > 0
            if not skipped:
                for k, v in step_sums.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v
                if "loss" in step_sums and cfg.loss_spike_factor > 0:
                    step_loss = step_sums["loss"] / max(step_sums.get("units", 1.0), 1.0)
                    if len(recent_losses) >= SPIKE_WARMUP:
                        median = statistics.median(recent_losses)
                        if median > 0 and step_loss > cfg.loss_spike_factor * median:
                            loss_spikes += 1
                            if is_main:
                                log.warning("loss spike at step %d: %.4g is %.1fx the median %.4g of the last %d steps "
                                            "(loss_spike_factor %g)", step, step_loss, step_loss / median, median,
                                            len(recent_losses), cfg.loss_spike_factor)
                    recent_losses.append(step_loss)
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
                    "tokens": window["tokens"] * world,  # real tokens of the steps since the last line
                    "tokens_per_second": window["tokens"] * world / elapsed,
                    "peak_memory_gib": round(_peak_memory_gib(device), 3),
                })
                if regrouping:  # this rank's forward passes per step, after regrouping
                    rec["micro_batches_per_step"] = window["micro"] / max(window["steps"], 1)
                rec = finalized(objective, rec)
                metrics.write(rec)
                if is_main:
                    log.info("step %d/%d %s", step, total_steps, fmt_pairs(rec, skip=("step",)))
                window = {"sums": {}, "tokens": 0, "micro": 0, "t0": time.perf_counter(), "steps": 0}

            at_epoch_end = step % steps_per_epoch == 0
            do_eval = eval_plan is not None and (
                (cfg.eval_strategy == "steps" and cfg.eval_steps and step % cfg.eval_steps == 0)
                or (cfg.eval_strategy == "epoch" and at_epoch_end)
            )
            if do_eval:
                hb.beat(step, "eval")
                ev = evaluate(model, objective, eval_plan, cfg, device, accelerator)
                last_eval = (step, ev)
                metrics.write({"step": step, **ev})
                if is_main:
                    log.info("eval at step %d: %s", step, fmt_pairs(ev))
                if _early_stop(state, ev, cfg):
                    result.stopped_early = True
            do_save = cfg.save_strategy != "no" and (
                (cfg.save_strategy == "steps" and step % cfg.save_steps == 0)
                or (cfg.save_strategy == "epoch" and at_epoch_end)
            )
            if (do_save or stop_now) and step < total_steps:
                hb.beat(step, "checkpoint")
                _save(accelerator, model, optimizer, scheduler, state, ckpt_dir, step, tokenizer, cfg)
            if on_step_end is not None:
                on_step_end(step)
            if stop_now and step < total_steps:  # at the last step the run simply finishes and saves
                if progress is not None:
                    progress.close()
                by = f"signal {stop.received}" if stop.received is not None else "a signal to another rank"
                if stop.received == signal.SIGINT:
                    by = "Ctrl-C"
                err = Preempted(f"stopped by {by} after step {step}; checkpoint saved",
                                hint="run again with --resume to continue from it")
                if stop.received == signal.SIGINT:
                    err.exit_code = INTERRUPTED_EXIT_CODE
                raise err
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
            log.info("final eval: %s", fmt_pairs(ev))
    result.global_step = state["global_step"]
    if state["nonfinite_skips"]:
        result.metrics["nonfinite_skipped_steps"] = state["nonfinite_skips"]
    if loss_spikes:
        result.metrics["loss_spikes"] = loss_spikes
    return result


def _save(accelerator, model, optimizer, scheduler, state, ckpt_dir, step, tokenizer, cfg):
    if getattr(accelerator.distributed_type, "value", "") == "DEEPSPEED":
        raise UserError(f"stopped at step {step} without a checkpoint: DeepSpeed ZeRO runs cannot be checkpointed yet",
                        hint="use --strategy fsdp2 for runs that must survive preemption")
    accelerator.wait_for_everyone()
    to_save, optim_to_save = accelerator.unwrap_model(model), optimizer
    if sharded.is_fsdp(accelerator):
        # Every rank joins the gather; rank 0 then writes full tensors (the usual checkpoint format).
        to_save, optim_to_save = sharded.gathered(to_save, optimizer)
    if accelerator.is_main_process:
        ckpt_io.save_checkpoint(ckpt_dir, step, model=to_save, optimizer=optim_to_save,
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


def _dump_nonfinite(output_dir: Path, step: int, indices: list[int], plan: MicroBatches, rank: int, what: str) -> Path:
    """Write the examples of a non-finite step to output_dir/nonfinite_stepN.json (one file per rank)."""
    dump = output_dir / (f"nonfinite_step{step}.json" if rank == 0 else f"nonfinite_step{step}_rank{rank}.json")
    dump.write_text(json.dumps({"step": step, "what": what, "rank": rank, "examples": plan.describe(indices)}, indent=2))
    return dump


def _raise_nonfinite(output_dir: Path, step: int, indices: list[int], plan: MicroBatches, rank: int, what: str = "loss",
                     skipped: int | None = None):
    dump = _dump_nonfinite(output_dir, step, indices, plan, rank, what)
    ids = plan.describe(indices)
    after = f" after {skipped} skipped step(s) (max_nonfinite_skips)" if skipped is not None else ""
    raise NonFiniteLossError(
        f"non-finite {what} at step {step}{after}; the batch's examples are listed in {dump} (first: {', '.join(ids[:3])})",
        hint="lower learning_rate, check those rows, use bf16 instead of fp16, or set on_nonfinite: skip "
             "to drop such steps (counted, at most max_nonfinite_skips)",
    )


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))




def _progress(total: int, start: int, is_main: bool):
    """A tqdm bar on a terminal; log lines alone when output goes to a file or CI."""
    if not is_main or not sys.stderr.isatty() or os.environ.get("LMPIPELINE_NO_PROGRESS"):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
