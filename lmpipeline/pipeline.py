"""Run the stages of a config in order, each starting from the previous one's output.

Layout written under output_dir:
    run.json                  resolved config, derived values, versions, git commit, data fingerprints,
                              per-stage status/times/metrics (never a secret)
    run.log                   the console log
    <stage>/final/            adapter (or full weights) + tokenizer, loadable with PEFT/transformers
    <stage>/metrics.jsonl     one line per logged step and per evaluation
    <stage>/checkpoints/      checkpoint-N folders for --resume

An existing run folder is never overwritten unless --overwrite is given (or continued with --resume).
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
from lmpipeline.errors import OutputExistsError, UserError
from lmpipeline.models.loading import check_model_reference
from lmpipeline.train.runtime import SECRET_ENV

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


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


def redact(obj):
    """Replace any secret value from the environment wherever it appears in `obj`."""
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


class RunRecord:
    """run.json, rewritten atomically after every change so a crash never leaves it half written."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data

    def save(self) -> None:
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


def run_pipeline(cfg: PipelineConfig, *, config_path: str | None = None, overwrite: bool = False,
                 resume: bool = False) -> dict:
    """Run every stage; returns the run record (also written to output_dir/run.json)."""
    from lmpipeline.methods.sft import SFTStage
    from lmpipeline.models.loading import load_tokenizer

    check_references(cfg)
    out, derived = resolve_output_dir(cfg, config_path)
    prepare_output_dir(out, overwrite=overwrite, resume=resume)
    _attach_log_file(out / "run.log")

    previous = None
    record_path = out / RUN_FILE
    if resume and record_path.exists():
        record = RunRecord(record_path, json.loads(record_path.read_text()))
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
        })
    record.save()

    model_path = cfg.model_name_or_path
    for name in cfg.stages:
        kind = STAGE_ALIASES[name]
        stage_cfg = cfg.stage(name).model_copy(update={"output_dir": str(out / name), "stage_name": name})
        entry = record.data["stages"].get(name, {})
        if resume and entry.get("status") == "done" and Path(entry.get("final_dir", "")).exists():
            log.info("[%s] already done in this run: skipping", name)
            previous = entry
            model_path = entry.get("next_model", model_path)
            continue
        entry.update({"kind": kind, "status": "running", "started": _now(), "model": model_path})
        record.data["stages"][name] = entry
        record.save()
        log.info("[%s] starting (%s) from %s", name, kind, model_path)
        if kind == "sft":
            tokenizer_name = cfg.tokenizer_name_or_path or model_path
            tokenizer = load_tokenizer(tokenizer_name, eos_token=stage_cfg.eos_token, pad_token=stage_cfg.pad_token,
                                       trust_remote_code=stage_cfg.trust_remote_code)
            result = SFTStage(stage_cfg).execute(tokenizer=tokenizer, model_name_or_path=model_path,
                                                 torch_dtype=cfg.torch_dtype, resume=resume)
        else:
            raise UserError(f"stage kind `{kind}` is not available yet", key=f"stages.{name}")
        entry.update({
            "status": "done",
            "finished": _now(),
            "final_dir": str(result.final_dir),
            "global_step": result.global_step,
            "metrics": result.metrics,
            "data": result.data,
            "adapter": stage_cfg.use_lora,
        })
        record.save()
        previous = entry
        # A later stage starts from this one's output (an adapter folder names its own base model).
        model_path = str(result.final_dir)
        entry["next_model"] = model_path
        record.save()
    record.data["finished"] = _now()
    record.save()
    del previous
    return record.data


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
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_SecretFilter())
    root.addHandler(handler)
