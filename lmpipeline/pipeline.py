"""Run the stages of a config in order, each starting from the previous one's output.

Layout written under output_dir:
    run.json                  resolved config, derived values, versions, git commit, data fingerprints,
                              per-stage status/times/metrics (never a secret)
    run.log                   the console log
    <stage>/final/            adapter (or full weights) + tokenizer, loadable with PEFT/transformers
    <stage>/metrics.jsonl     one line per logged step and per evaluation
    <stage>/checkpoints/      checkpoint-N folders for --resume

An existing run folder is never overwritten unless --overwrite is given (or continued with --resume).

Several processes (accelerate launch, torchrun, `lmpipeline launch`): every process runs the
training stages; only the main process prepares the output folder, writes run.json and the report,
and runs the eval, merge and package stages (the others finish after their last training stage).
Rank 0 logs to run.log, rank R to logs/rank-R.log. A stage stopped by a preemption signal is
recorded as status "preempted" (how `lmpipeline launch` tells a preemption from a crash).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from lmpipeline.config.loader import key_location
from lmpipeline.config.schema import STAGE_ALIASES, PipelineConfig
from lmpipeline.context import RUN_FILE, RunContext, StageOutput, StageResult
from lmpipeline.errors import OutputExistsError, UserError
from lmpipeline.evaluate.generation import read_chain_file
from lmpipeline.evaluate.stage import EvalStage
from lmpipeline.export.card import render_stage_card
from lmpipeline.export.merge import MergeStage
from lmpipeline.export.package import PackageStage
from lmpipeline.methods import method_for
from lmpipeline.models.loading import check_model_reference, load_tokenizer
from lmpipeline.plan.requirements import check_requirements
from lmpipeline.plan.stage_plan import prepare_stage
from lmpipeline.report.html import write_report
from lmpipeline.secrets import redact
from lmpipeline.train.loop import Preempted
from lmpipeline.train.runtime import distributed_state, shutdown_distributed

log = logging.getLogger(__name__)

# The stages that follow training, by kind; training stages are the method table's (lmpipeline/methods).
LIFECYCLE_STAGES = {"eval": EvalStage, "merge": MergeStage, "package": PackageStage}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lmpipeline", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit(path: Path) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class RunRecord:
    """run.json, rewritten atomically after every change so a crash never leaves it half written."""

    def __init__(self, path: Path, data: dict, *, enabled: bool = True):
        self.path = path
        self.data = data
        self.enabled = enabled  # False on the non-main processes of a multi-process run

    def save(self) -> None:
        if not self.enabled:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(redact(self.data), indent=2, default=str))
        os.replace(tmp, self.path)


def resolved_config(cfg: PipelineConfig) -> dict:
    """The config with every default filled in: what the run actually used."""
    data = cfg.model_dump()
    data["stage_configs"] = {name: cfg.stage(name).model_dump(exclude={"stage_name", "output_dir"}) for name in cfg.stages
                             if name in STAGE_ALIASES}
    return data


def resolve_output_dir(cfg: PipelineConfig, config_path: str | None) -> tuple[Path, dict]:
    derived = dict(cfg._derived)
    if cfg.output_dir:
        return Path(cfg.output_dir), derived
    stem = Path(config_path).stem if config_path else "run"
    out = Path("outputs") / stem
    derived["output_dir"] = str(out)
    log.info("output_dir not set: using %s (stored in run.json as a derived value)", out)
    return out, derived


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    has_run = out.exists() and any(out.iterdir())
    if has_run and not (overwrite or resume):
        raise OutputExistsError(
            f"output folder `{out}` already holds a run",
            key="output_dir",
            hint="use --resume to continue it, --overwrite to replace it, or choose another output_dir",
        )
    if has_run and overwrite and not resume:
        if not (out / RUN_FILE).exists() and any(out.iterdir()):
            raise OutputExistsError(f"`{out}` is not empty and holds no run.json: refusing to delete it", key="output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def check_references(cfg: PipelineConfig) -> None:
    """Fail before any loading when the model or a local data file is missing."""
    try:
        check_model_reference(cfg.model_name_or_path)
    except UserError as e:
        raise UserError(str(e).split(": ", 1)[-1], key="model_name_or_path", where=key_location(cfg, "model_name_or_path")) from None


def completed_stages(record: dict) -> list[StageOutput]:
    """The finished stages of a run record, in order, as later stages see them."""
    return [
        StageOutput(name, e.get("kind", ""), Path(e["final_dir"]) if e.get("final_dir") else None,
                    bool(e.get("adapter")), e.get("metrics") or {}, trained=bool(e.get("trained")))
        for name, e in record["stages"].items() if e.get("status") == "done"
    ]


def run_stage(kind: str, stage_cfg, cfg: PipelineConfig, out: Path, record: dict, *, resume: bool) -> StageResult:
    """Run one stage. Training stages start from the latest model-producing stage (or the base): a method
    that continues (start "continue") loads that model as it is; one that chains (start "chain") gets the
    base and the earlier stage, whose adapters it merges or stacks under its own."""
    ctx = RunContext(run_dir=out, base_model=cfg.model_name_or_path, tokenizer_path=cfg.tokenizer_name_or_path,
                     torch_dtype=cfg.torch_dtype, completed=completed_stages(record))
    method = method_for(kind)
    if method is None:
        return LIFECYCLE_STAGES[kind](stage_cfg).execute(ctx)
    previous = ctx.latest_model()
    tokenizer_name = cfg.tokenizer_name_or_path or (str(previous.final_dir) if previous else cfg.model_name_or_path)
    tokenizer = load_tokenizer(tokenizer_name, eos_token=stage_cfg.eos_token, pad_token=stage_cfg.pad_token,
                               trust_remote_code=stage_cfg.trust_remote_code)
    stage = method.stage(stage_cfg)
    if method.start == "chain":
        return stage.execute(tokenizer=tokenizer, model_name_or_path=cfg.model_name_or_path,
                             torch_dtype=cfg.torch_dtype, resume=resume, previous=previous)
    # A later stage continues from the previous model (an adapter folder names its own base).
    start = str(previous.final_dir) if previous else cfg.model_name_or_path
    return stage.execute(tokenizer=tokenizer, model_name_or_path=start, torch_dtype=cfg.torch_dtype, resume=resume)


def run_pipeline(cfg: PipelineConfig, *, config_path: str | None = None, overwrite: bool = False,
                 resume: bool = False) -> dict:
    """Run every stage; returns the run record (also written to output_dir/run.json)."""
    check_references(cfg)
    check_requirements(cfg)  # CUDA, bitsandbytes, trackers: fail now, as validate does, not after tokenising
    out, derived = resolve_output_dir(cfg, config_path)
    state = distributed_state()  # joins the process group under a multi-process launcher; else a no-op
    is_main = state.is_main_process
    _prepare_on_main(state, out, overwrite=overwrite, resume=resume)
    _attach_log_file(out / "run.log" if is_main else out / "logs" / f"rank-{state.process_index}.log")

    record_path = out / RUN_FILE
    if resume and record_path.exists():
        record = RunRecord(record_path, json.loads(record_path.read_text()), enabled=is_main)
        record.data.setdefault("resumed", []).append(_now())
    else:
        record = RunRecord(record_path, {
            "created": _now(),
            "config_file": config_path,
            "config": resolved_config(cfg),
            "derived": derived,
            "versions": package_versions(),
            "git_commit": git_commit(Path(config_path).parent if config_path else Path.cwd()),
            "stages": {},
        }, enabled=is_main)
    record.save()

    for name in cfg.stages:
        kind = STAGE_ALIASES[name]
        method = method_for(kind)
        if state.num_processes > 1:
            if method is None and not is_main:
                continue  # eval, merge and package run on the main process only
            if method is not None:
                state.wait_for_everyone()  # the main process may still be in an eval/merge stage
                if not is_main and record_path.exists():
                    # Stages only the main process ran (a merge) are known from its run.json.
                    record.data["stages"] = json.loads(record_path.read_text())["stages"]
        stage_cfg = cfg.stage(name).model_copy(update={"output_dir": str(out / name), "stage_name": name})
        entry = record.data["stages"].get(name, {})
        if resume and entry.get("status") == "done" and (entry.get("final_dir") is None or Path(entry["final_dir"]).exists()):
            log.info("[%s] already done in this run: skipping", name)
            continue
        latest = RunContext(out, cfg.model_name_or_path, completed=completed_stages(record.data)).latest_model()
        # The model this stage starts from: how later tools rebuild adapter chains from run.json.
        start = str(latest.final_dir) if latest else cfg.model_name_or_path
        entry.update({"kind": kind, "status": "running", "started": _now(), "model": start})
        record.data["stages"][name] = entry
        record.save()
        log.info("[%s] starting (%s)", name, kind)
        if method is not None:
            entry["trained"] = True
            stage_cfg = _fit_stage(stage_cfg, method, cfg, record.data, entry)
            record.save()
        try:
            result = run_stage(kind, stage_cfg, cfg, out, record.data, resume=resume)
        except Preempted:
            entry.update({"status": "preempted", "preempted": _now()})
            record.save()
            raise
        entry.update({
            "status": "done",
            "finished": _now(),
            "final_dir": str(result.final_dir) if result.final_dir is not None else None,
            "adapter": result.adapter,
            "global_step": result.global_step,
            "metrics": result.metrics,
            "data": result.data,
            "notes": result.notes,
        })
        record.save()
        if is_main and method is not None and result.final_dir is not None:
            _write_stage_card(result, stage_cfg, method, cfg)
    record.data["finished"] = _now()
    record.save()
    if is_main:
        _write_report(out)
    shutdown_distributed()
    return record.data


def _fit_stage(stage_cfg, method, cfg: PipelineConfig, record: dict, entry: dict):
    """Resolve `auto` values and check the stage fits the GPU before any weight loads
    (lmpipeline/plan/stage_plan.py); resolved values go to run.json's derived, the estimate to the stage entry."""
    resolved, derived, estimate = prepare_stage(stage_cfg, method, model=cfg.model_name_or_path, preset=cfg.preset,
                                                torch_dtype=cfg.torch_dtype)
    for key, value in derived.items():
        record.setdefault("derived", {})[f"stage_configs.{stage_cfg.stage_name}.{key}"] = value
    if estimate:
        entry["estimate"] = estimate
    return resolved


def _prepare_on_main(state, out: Path, *, overwrite: bool, resume: bool) -> None:
    """Only the main process checks, deletes or creates the output folder; the others wait for it.

    Otherwise a second process would find the main's fresh run.json and refuse it as an old run, or
    two processes would delete the folder under each other. The main's error reaches every process.
    """
    error = None
    if state.is_main_process:
        try:
            prepare_output_dir(out, overwrite=overwrite, resume=resume)
        except UserError as e:
            error = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([str(error) if error is not None else None], from_process=0)[0]
        if message is not None and error is None:
            error = UserError(f"the main process could not prepare the output folder: {message}")
    if error is not None:
        raise error


def _write_stage_card(result: StageResult, stage_cfg, method, cfg: PipelineConfig) -> None:
    """<stage>/final/README.md: what was trained, on what, and how to load it (instead of PEFT's template)."""
    try:
        chain = read_chain_file(result.final_dir)
        card = render_stage_card(result.final_dir, stage_name=result.stage_name, kind=method.name,
                                 method_title=method.title, shown_keys=method.card_keys,
                                 base_model=chain.base if chain else cfg.model_name_or_path,
                                 params=stage_cfg.model_dump(), data=result.data or {}, metrics=result.metrics or {},
                                 global_step=result.global_step, adapter=result.adapter,
                                 chain=[str(a) for a in chain.adapters] if chain else None)
        (result.final_dir / "README.md").write_text(redact(card), encoding="utf-8")  # paths may hold a token
    except Exception as e:  # noqa: BLE001 - the card describes the model; failing to write it must not fail the run
        log.warning("[%s] model card not written: %s", result.stage_name, e)


def _write_report(out: Path) -> None:
    # The report is a view of the run; failing to draw it must not fail a finished run.
    try:
        log.info("report: %s", write_report(out))
    except Exception as e:  # noqa: BLE001
        log.warning("report.html could not be written: %s", e)


class _SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def _attach_log_file(path: Path) -> None:
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_SecretFilter())
    root.addHandler(handler)
