"""Run the stages of a config in order, each starting from the previous one's output.

Layout written under output_dir:
    run.json                  resolved config, derived values, versions, git commit, data fingerprints,
                              per-stage status/times/metrics (never a secret)
    run.log                   the console log
    <stage>/final/            adapter (or full weights) + tokenizer, loadable with PEFT/transformers
    <stage>/metrics.jsonl     one line per logged step and per evaluation
    <stage>/checkpoints/      checkpoint-N folders for --resume

An existing run folder is never overwritten unless --overwrite is given (or continued with --resume);
what may be deleted, what overlaps an input and who holds a live run is decided by lmpipeline/outputs.py.
run.json names the run's own stage folders relative to the run folder, so a copied or moved run
folder is self-contained. `--resume` refuses a changed resolved config or changed data files unless
`--allow-changed-config` is given (then both are recorded under "resumed_with_changes").
A stage that raises is recorded as "failed" with its message; Ctrl-C (and SIGTERM outside training)
as "interrupted".

Several processes (accelerate launch, torchrun, `lmpipeline launch`): every process runs the
training stages; only the main process prepares the output folder, writes run.json and the report,
and runs the eval, merge and package stages (the others finish after their last training stage).
Rank 0 logs to run.log, rank R to logs/rank-R.log. A stage stopped by a preemption signal is
recorded as status "preempted" (how `lmpipeline launch` tells a preemption from a crash).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

from lmpipeline.config.loader import key_location
from lmpipeline.config.schema import STAGE_ALIASES, PipelineConfig
from lmpipeline import outputs
from lmpipeline.context import RUN_FILE, RunContext, StageOutput, StageResult
from lmpipeline.data.cache import file_sha256
from lmpipeline.errors import OutputExistsError, UserError
from lmpipeline.evaluate.generation import read_chain_file
from lmpipeline.evaluate.stage import EvalStage
from lmpipeline.export.card import render_stage_card
from lmpipeline.export.merge import MergeStage
from lmpipeline.export.package import PackageStage
from lmpipeline.methods import method_for
from lmpipeline.models.adapter_chain import chain_includes
from lmpipeline.models.loading import check_model_reference, load_tokenizer
from lmpipeline.plan.requirements import check_requirements
from lmpipeline.plan.stage_plan import prepare_stage
from lmpipeline.report.html import write_report
from lmpipeline.secrets import redact
from lmpipeline.train.loop import INTERRUPTED_EXIT_CODE, Preempted
from lmpipeline.train.runtime import distributed_state, shutdown_distributed

log = logging.getLogger(__name__)

# The stages that follow training, by kind; training stages are the method table's (lmpipeline/methods).
LIFECYCLE_STAGES = {"eval": EvalStage, "merge": MergeStage, "package": PackageStage}
# Stage keys that name something the run reads: none may overlap the output folder, and the data
# files among them are fingerprinted so that --resume notices a change.
INPUT_KEYS = ("dataset_name_or_path", "eval_dataset_name_or_path", "chat_template_path", "golden_set", "eval_dataset",
              "base_model", "llama_cpp_convert")
DATA_KEYS = ("dataset_name_or_path", "eval_dataset_name_or_path", "golden_set", "eval_dataset")


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
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
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


def config_inputs(cfg: PipelineConfig, config_path: str | None = None) -> dict[str, str]:
    """{dotted key: path} of everything the config reads (model, tokenizer, data, templates, the config)."""
    found = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name_or_path": cfg.tokenizer_name_or_path}
    if config_path:
        found["the config file"] = config_path
    for name in cfg.stages:
        if name not in STAGE_ALIASES:
            continue
        values = cfg.stage(name).model_dump()
        for key in INPUT_KEYS:
            value = values.get(key)
            if isinstance(value, list):
                for i, spec in enumerate(value):
                    found[f"stage_configs.{name}.{key}[{i}]"] = spec.get("path") if isinstance(spec, dict) else spec
            elif isinstance(value, str) and value:
                found[f"stage_configs.{name}.{key}"] = value
    return {k: v for k, v in found.items() if v}


def data_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """{dotted key: sha256} of the local data files the config reads (folders: their files' names and sizes)."""
    out = {}
    for key, value in config_inputs(cfg).items():
        if key.rsplit(".", 1)[-1].split("[")[0] not in DATA_KEYS:
            continue
        p = Path(value).expanduser()
        if p.is_file():
            out[key] = file_sha256(p)
        elif p.is_dir():
            listing = sorted(f"{f.relative_to(p)}:{f.stat().st_size}" for f in p.rglob("*") if f.is_file())
            out[key] = "folder:" + hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return out


def check_output_paths(cfg: PipelineConfig, config_path: str | None) -> None:
    """The output folder overlaps no input and is not a file: what `validate` can say before a run."""
    out, _ = resolve_output_dir(cfg, config_path)
    outputs.check_disjoint(out, config_inputs(cfg, config_path))
    outputs.check_is_folder(out, key="output_dir")


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool, inputs: dict | None = None,
                       stage_names=()) -> outputs.RunLock:
    """Check, lock and (with --overwrite) empty the run folder; returns the lock this process now holds."""
    outputs.check_disjoint(out, inputs or {})
    outputs.check_is_folder(out, key="output_dir")
    if out.is_dir():
        _check_run_folder(out, overwrite=overwrite, resume=resume)  # before a lock file goes into someone's folder
    out.mkdir(parents=True, exist_ok=True)
    lock = outputs.RunLock(out).acquire()
    try:
        _check_run_folder(out, overwrite=overwrite, resume=resume)  # again: now no other process can change it
        if overwrite and not resume:
            outputs.remove_paths(outputs.run_owned_entries(out, stage_names))
        if outputs.marker_kind(out) != "run":
            outputs.mark(out, "run")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_run_folder(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a folder lmpipeline may not write into, or may not replace, as asked."""
    entries = [p for p in out.iterdir() if p.name != outputs.LOCK_FILE]
    ours = outputs.marker_kind(out) == "run"
    if entries and not ours and not (out / RUN_FILE).exists():
        raise OutputExistsError(f"`{out}` is not empty and is not a run folder lmpipeline created: it will neither "
                                "write into it nor delete anything in it", key="output_dir",
                                hint="choose another output_dir (a new or empty folder)")
    if entries and not (overwrite or resume):
        raise OutputExistsError(
            f"output folder `{out}` already holds a run",
            key="output_dir",
            hint="use --resume to continue it, --overwrite to replace it, or choose another output_dir",
        )
    if entries and overwrite and not resume:
        if not ours:
            raise OutputExistsError(f"`{out}` holds a run.json but no {outputs.MARKER}: it was not made by this "
                                    "lmpipeline, so --overwrite will not delete it", key="output_dir",
                                    hint="delete the folder yourself if it may go, or choose another output_dir")


def in_run(out: Path, path) -> str | None:
    """How run.json names `path`: relative to the run folder when it is inside it (a copied run stays whole)."""
    if path is None:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(p.resolve()) if p.exists() else str(path)  # outside the run (a base model): absolute


def from_run(out: Path, recorded) -> Path | None:
    """A path as run.json records it, found under this run folder when it is relative."""
    if not recorded or recorded == "None":
        return None
    return out / recorded


def check_references(cfg: PipelineConfig) -> None:
    """Fail before any loading when the model or a local data file is missing."""
    try:
        check_model_reference(cfg.model_name_or_path)
    except UserError as e:
        raise UserError(str(e).split(": ", 1)[-1], key="model_name_or_path", where=key_location(cfg, "model_name_or_path")) from None


def completed_stages(record: dict, out: Path) -> list[StageOutput]:
    """The finished stages of a run record, in order, as later stages see them."""
    return [
        StageOutput(name, e.get("kind", ""), from_run(out, e.get("final_dir")), bool(e.get("adapter")),
                    e.get("metrics") or {}, trained=bool(e.get("trained")))
        for name, e in record["stages"].items() if e.get("status") == "done"
    ]


def run_stage(kind: str, stage_cfg, cfg: PipelineConfig, out: Path, record: dict, *, resume: bool) -> StageResult:
    """Run one stage. Training stages start from the latest model-producing stage (or the base): a method
    that continues (start "continue") loads that model as it is; one that chains (start "chain") gets the
    base and the earlier stage, whose adapters it merges or stacks under its own."""
    ctx = RunContext(run_dir=out, base_model=cfg.model_name_or_path, tokenizer_path=cfg.tokenizer_name_or_path,
                     torch_dtype=cfg.torch_dtype, completed=completed_stages(record, out))
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
                 resume: bool = False, allow_changed_config: bool = False) -> dict:
    """Run every stage; returns the run record (also written to output_dir/run.json)."""
    check_references(cfg)
    check_requirements(cfg)  # CUDA, bitsandbytes, trackers: fail now, as validate does, not after tokenising
    out, derived = resolve_output_dir(cfg, config_path)
    state = distributed_state()  # joins the process group under a multi-process launcher; else a no-op
    is_main = state.is_main_process
    lock = _prepare_on_main(state, out, overwrite=overwrite, resume=resume, inputs=config_inputs(cfg, config_path),
                            stage_names=cfg.stages)
    try:
        _attach_log_file(out / "run.log" if is_main else out / "logs" / f"rank-{state.process_index}.log")
        record = _open_record(cfg, out, derived, config_path, resume=resume, allow_changed_config=allow_changed_config,
                              is_main=is_main)
        for name in cfg.stages:
            _run_one(name, cfg, out, record, state, resume=resume)
        record.data["finished"] = _now()
        record.save()
        if is_main:
            _write_report(out)
    finally:
        if lock is not None:
            lock.release()
    shutdown_distributed()
    return record.data


def _open_record(cfg: PipelineConfig, out: Path, derived: dict, config_path: str | None, *, resume: bool,
                 allow_changed_config: bool, is_main: bool) -> RunRecord:
    """run.json: a new record, or on --resume the old one, checked against what the run would use now."""
    record_path = out / RUN_FILE
    config = json.loads(json.dumps(resolved_config(cfg), default=str))
    fingerprints = data_fingerprints(cfg)
    if resume and record_path.exists():
        record = RunRecord(record_path, json.loads(record_path.read_text()), enabled=is_main)
        changes = resume_changes(record.data, config, fingerprints)
        if changes and not allow_changed_config:
            shown = "; ".join(f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in list(changes.items())[:8])
            more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
            raise UserError(f"the run in {out} was made with a different config or data: {shown}{more}", key="--resume",
                            hint="undo the change to continue the run as it was, or pass --resume --allow-changed-config "
                                 "to continue with the new values (both are recorded in run.json)")
        record.data.setdefault("resumed", []).append(_now())
        _add_new_stages(record.data, config, fingerprints)
        if changes:
            record.data.setdefault("resumed_with_changes", []).append({"at": _now(), "changes": changes})
            record.data["config"], record.data["data_files"] = config, fingerprints
    else:
        record = RunRecord(record_path, {
            "created": _now(),
            "config_file": config_path,
            "config": config,
            "derived": derived,
            "data_files": fingerprints,
            "versions": package_versions(),
            "git_commit": git_commit(Path(config_path).parent if config_path else Path.cwd()),
            "stages": {},
        }, enabled=is_main)
    record.save()
    return record


def _add_new_stages(data: dict, config: dict, fingerprints: dict) -> None:
    """A resumed run that now runs stages it did not before (`--stages`) records their values too."""
    old = data.setdefault("config", {})
    configs = old.setdefault("stage_configs", {})
    for name, values in (config.get("stage_configs") or {}).items():
        configs.setdefault(name, values)
    old["stages"] = list(dict.fromkeys([*(old.get("stages") or []), *(config.get("stages") or [])]))
    files = data.setdefault("data_files", {})
    for key, value in fingerprints.items():
        files.setdefault(key, value)


def resume_changes(record: dict, config: dict, fingerprints: dict) -> dict:
    """{dotted key: {"from", "to"}} for every resolved-config value and data file that differs from the run's.

    A stage that only one side has is no change: `--stages` runs a subset, and a later `--resume --stages`
    adds the next stage to the run (its values are then recorded); what must not change is a stage both
    know."""
    changes = {}

    def walk(old, new, prefix):
        if prefix.startswith("stage_configs.") and prefix.count(".") == 1 and (old is None or new is None):
            return  # a stage run now or before, not both
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new), key=str):
                walk(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif old != new:
            changes[prefix] = {"from": old, "to": new}

    walk(record.get("config") or {}, config, "")
    changes.pop("output_dir", None)  # the same run, found by a different spelling of its path
    changes.pop("stages", None)  # which stages run now (--stages); their configs are compared above
    if "data_files" in record:  # older run.json files have none to compare with
        for key in sorted(set(record["data_files"]) | set(fingerprints)):
            old, new = record["data_files"].get(key), fingerprints.get(key)
            if old != new and old is not None and new is not None:
                changes[f"{key} (file contents)"] = {"from": old, "to": new}
    return changes


def _run_one(name: str, cfg: PipelineConfig, out: Path, record: RunRecord, state, *, resume: bool) -> None:
    """One stage, with its status in run.json: running, then done, failed, interrupted or preempted."""
    kind = STAGE_ALIASES[name]
    method = method_for(kind)
    is_main = state.is_main_process
    record_path = out / RUN_FILE
    if state.num_processes > 1:
        if method is None and not is_main:
            return  # eval, merge and package run on the main process only
        if method is not None:
            state.wait_for_everyone()  # the main process may still be in an eval/merge stage
            if not is_main and record_path.exists():
                # Stages only the main process ran (a merge) are known from its run.json.
                record.data["stages"] = json.loads(record_path.read_text())["stages"]
    stage_cfg = cfg.stage(name).model_copy(update={"output_dir": str(out / name), "stage_name": name})
    entry = record.data["stages"].get(name, {})
    final = from_run(out, entry.get("final_dir"))
    if resume and entry.get("status") == "done" and (final is None or final.exists()):
        log.info("[%s] already done in this run: skipping", name)
        return
    latest = RunContext(out, cfg.model_name_or_path, completed=completed_stages(record.data, out)).latest_model()
    # The model this stage starts from: how later tools rebuild adapter chains from run.json.
    start = in_run(out, latest.final_dir) if latest else cfg.model_name_or_path
    for stale in ("error", "failed", "interrupted"):
        entry.pop(stale, None)
    entry.update({"kind": kind, "status": "running", "started": _now(), "model": start})
    record.data["stages"][name] = entry
    record.save()
    log.info("[%s] starting (%s)", name, kind)
    try:
        if method is not None:
            entry["trained"] = True
            stage_cfg = _fit_stage(stage_cfg, method, cfg, record.data, entry)
            record.save()
        result = run_stage(kind, stage_cfg, cfg, out, record.data, resume=resume)
    except Preempted as e:
        status = "interrupted" if e.exit_code == INTERRUPTED_EXIT_CODE else "preempted"
        entry.update({"status": status, status: _now(), "error": str(e)})
        _record_stop(record, out, is_main)
        raise
    except KeyboardInterrupt:
        entry.update({"status": "interrupted", "interrupted": _now(),
                      "error": "interrupted; the last complete checkpoint (if any) is kept"})
        _record_stop(record, out, is_main)
        raise
    except BaseException as e:
        entry.update({"status": "failed", "failed": _now(), "error": str(e) or type(e).__name__})
        # For the CLI's last-resort message (cli._internal_error_message): where, and which log gets the traceback.
        e.lmpipeline_stage = f"stage `{name}` ({kind}) of the run in {out}"
        e.lmpipeline_log = out / "run.log" if is_main else out / "logs" / f"rank-{state.process_index}.log"
        _record_stop(record, out, is_main)
        raise
    entry.update({
        "status": "done",
        "finished": _now(),
        "final_dir": in_run(out, result.final_dir),
        "adapter": result.adapter,
        "global_step": result.global_step,
        "metrics": result.metrics,
        "data": result.data,
        "notes": result.notes,
    })
    record.save()
    if is_main and method is not None and result.final_dir is not None:
        _write_stage_card(result, stage_cfg, method, cfg)


def _record_stop(record: RunRecord, out: Path, is_main: bool) -> None:
    """A stage ended without finishing: run.json and the report say so before the error goes on."""
    record.save()
    if is_main:
        _write_report(out)


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


def _prepare_on_main(state, out: Path, *, overwrite: bool, resume: bool, inputs: dict,
                     stage_names) -> outputs.RunLock | None:
    """Only the main process checks, deletes or creates the output folder; the others wait for it.

    Otherwise a second process would find the main's fresh run.json and refuse it as an old run, or
    two processes would delete the folder under each other. The main's error reaches every process.
    """
    error, lock = None, None
    if state.is_main_process:
        try:
            lock = prepare_output_dir(out, overwrite=overwrite, resume=resume, inputs=inputs, stage_names=stage_names)
        except UserError as e:
            error = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([str(error) if error is not None else None], from_process=0)[0]
        if message is not None and error is None:
            error = UserError(f"the main process could not prepare the output folder: {message}")
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    return lock


def _write_stage_card(result: StageResult, stage_cfg, method, cfg: PipelineConfig) -> None:
    """<stage>/final/README.md: what was trained, on what, and how to load it (instead of PEFT's template)."""
    try:
        chain = read_chain_file(result.final_dir)
        card = render_stage_card(result.final_dir, stage_name=result.stage_name, kind=method.name,
                                 method_title=method.title, shown_keys=method.card_keys,
                                 model_class=method.model_class, usage_example=method.usage_example,
                                 model_kwargs=method.model_kwargs,
                                 base_model=chain.base if chain else cfg.model_name_or_path,
                                 params=stage_cfg.model_dump(), data=result.data or {}, metrics=result.metrics or {},
                                 global_step=result.global_step, adapter=result.adapter,
                                 chain=[str(a) for a in chain.adapters] if chain else None,
                                 includes=chain_includes(result.final_dir))
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
