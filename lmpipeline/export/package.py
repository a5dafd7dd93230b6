"""Package a trained model for distribution, verify and unpack packages.

A package is <output_dir>/<name>.tar.gz (plus <name>.tar.gz.sha256) holding one folder <name>/:

    model/               the adapter, or the merged / full model (a chain of adapters: model/01_sft/,
                         model/02_dpo/, ... applied in that order)
    README.md            model card with Hub front matter and usage code (lmpipeline/export/card.py)
    metadata.json        base model, stage chain, every stage's hyper-parameters (from run.json), data
                         fingerprints, metrics and the eval table, package versions, and the sha256 and
                         size of every other file in the package
    requirements.txt     the packages that load it, at least the versions it was made with

What goes in (`source`): auto = the merged model when a merge stage ran, else the latest trained stage
(adapter chain or full weights); adapter / merged force one. The small files are also left in
<output_dir>/<name>/ to read without unpacking. The archive is deterministic (sorted members, fixed
times, no owners, metadata dated by the model, not the packaging), so the same model gives the same
sha256.

`verify_archive` re-hashes every file against metadata.json without extracting and reports missing,
extra and changed files; members that are unsafe to extract (absolute paths, `..`, links, device
files, FIFOs) are reported too. `extract_package` refuses any archive with an unsafe member, then
extracts with tarfile's "data" filter as a second guard.

Opt-in extras:
  push_to_hub  uploads the model files (at the repo root; chains in subfolders), README.md and
               metadata.json in one commit. The token is read from HF_TOKEN only, passed to
               huggingface_hub in memory, and never written to any file or log.
  gguf         runs llama.cpp's convert_hf_to_gguf.py (llama_cpp_convert, else found on PATH) on full
               weights; writes <name>.gguf beside the archive. When the script is missing or the
               package holds an adapter, a message says what to do and the package is still made.

Raises UserError: nothing to package, a merged model asked for without a merge stage, push_to_hub
without HF_TOKEN or while offline, a Hub error, an unsafe archive on extraction.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lmpipeline import outputs
from lmpipeline.config.lifecycle import PackageConfig
from lmpipeline.context import RUN_FILE, RunContext, StageResult
from lmpipeline.data.cache import file_sha256
from lmpipeline.errors import UserError
from lmpipeline.evaluate import generation as gen
from lmpipeline.export.card import render_card
from lmpipeline.models.adapter_chain import CHAIN_FILE
from lmpipeline.secrets import redact

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "lmpipeline-package/1"
METADATA = "metadata.json"
# Files of a model folder that are not part of the model (training leftovers).
SKIP_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


@dataclass
class PackageResult:
    archive: Path
    sha256: str
    folder: Path
    metadata: dict
    hub_url: str | None = None
    gguf: dict = field(default_factory=dict)


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str]
    files_checked: int
    metadata: dict | None = None

    def summary(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.files_checked} file(s) checked"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


# ---------------------------------------------------------------------------------------- hashing


def package_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lmpipeline", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------- content


@dataclass
class Content:
    """What a package holds: (archive path under model/, file on disk) pairs, and how to load them."""

    kind: str  # adapter | adapter_chain | merged | full
    spec: gen.ModelSpec
    files: list[tuple[str, Path]]
    adapters: list[dict]
    merge_info: dict | None = None
    run: gen.RunInfo | None = None
    generated: dict[str, bytes] = field(default_factory=dict)  # files written for the package itself


def _model_files(folder: Path, prefix: str) -> list[tuple[str, Path]]:
    out = []
    for f in sorted(folder.rglob("*")):
        # A chain file points at the training run's folders; packages get one of their own.
        if f.is_dir() or f.name in SKIP_FILES or f.name.endswith(".tmp") or f.name == CHAIN_FILE:
            continue
        rel = f.relative_to(folder).as_posix()
        if rel.split("/")[0] in ("checkpoints",):
            continue
        out.append((f"{prefix}/{rel}", f))
    return out


def select_content(path: str | Path, source: str = "auto", base_model: str | None = None) -> Content:
    """Decide what to package from a run folder, stage folder, adapter folder or model folder."""
    p = Path(path)
    run = None
    found = gen.find_run_dir(p) if p.exists() else None
    if found is not None:
        run = gen.read_run(found[0])
        stage = found[1]
        if stage is None:
            merged = [s for s in run.model_stages() if s.kind == "merge"]
            if source == "merged" and not merged:
                raise UserError(f"run {run.run_dir} has no finished merge stage", key="source",
                                hint="add a merge stage, run `lmpipeline merge`, or use source: adapter")
            if merged and source in ("auto", "merged"):
                spec = gen.resolve_in_run(run, merged[-1].name, base_model)
            else:
                trained = run.model_stages(trained_only=True)
                if not trained:
                    raise UserError(f"run {run.run_dir} has no finished sft/dpo stage to package")
                spec = gen.resolve_in_run(run, trained[-1].name, base_model)
        else:
            spec = gen.resolve_in_run(run, stage, base_model)
    else:
        spec = gen.resolve_model(p, base_model)
        if not Path(spec.base).exists() and not spec.adapters:
            raise UserError(f"`{path}` is not a local model folder: nothing to package")
    if source == "merged" and spec.adapters:
        raise UserError("source: merged asks for full weights but this is a LoRA adapter", key="source",
                        hint="merge it first (lmpipeline merge PATH --output DIR) and package that folder")
    if spec.adapters:
        if len(spec.adapters) == 1:
            files = _model_files(spec.adapters[0], "model")
            adapters = [{"stage": spec.stage_names[-1], "folder": "model"}]
            kind = "adapter"
        else:
            files, adapters = [], []
            names = spec.stage_names[-len(spec.adapters):]
            for i, (a, n) in enumerate(zip(spec.adapters, names), start=1):
                folder = f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', n)}"
                files += _model_files(a, f"model/{folder}")
                adapters.append({"stage": n, "folder": folder})
            kind = "adapter_chain"
        content = Content(kind, spec, files, adapters, None, run)
        if kind == "adapter_chain":
            last = adapters[-1]["folder"]
            content.generated[f"model/{last}/{CHAIN_FILE}"] = json.dumps({
                "format": "lmpipeline-adapter-chain/1", "base_model": spec.base,
                "adapters": [{"stage": a["stage"], "path": f"../{a['folder']}"} for a in adapters[:-1]]
                + [{"stage": adapters[-1]["stage"], "path": "."}],
                "apply": "load base_model, then for each adapter in order: PeftModel.from_pretrained + merge_and_unload",
            }, indent=2).encode()
        return content
    folder = Path(spec.base)
    merge_info = None
    if (folder / "merge_info.json").is_file():
        merge_info = json.loads((folder / "merge_info.json").read_text())
    kind = "merged" if merge_info is not None else "full"
    return Content(kind, spec, _model_files(folder, "model"), [], merge_info, run)


# --------------------------------------------------------------------------------------- metadata


def collect_metadata(content: Content, name: str) -> dict:
    run = content.run
    base = content.spec.base
    if content.merge_info:
        base = content.merge_info.get("base_model", base)
    stages, datasets = [], []
    fingerprints, metrics, evaluation = {}, {}, None
    config = {}
    if run is not None:
        config = run.data.get("config") or {}
        for s in run.stages:
            if s.status != "done":  # the package stage itself, or a stage that failed
                continue
            hp = run.stage_config(s.name)
            src = hp.get("dataset_name_or_path")
            if isinstance(src, str):
                datasets.append(src)
            elif isinstance(src, list):
                datasets += [d.get("path") for d in src if isinstance(d, dict) and d.get("path")]
            fp = (s.entry.get("data") or {}).get("fingerprint")
            if fp:
                fingerprints[s.name] = fp
            if s.entry.get("metrics"):
                metrics[s.name] = s.entry["metrics"]
            stages.append({"name": s.name, "kind": s.kind, "trained": s.trained, "status": s.status, "adapter": s.adapter,
                           "global_step": s.entry.get("global_step"), "data_fingerprint": fp,
                           "metrics": s.entry.get("metrics") or {}, "hyperparameters": hp,
                           "notes": s.entry.get("notes")})
            results = run.run_dir / s.name / "results.json"
            if s.kind == "eval" and results.is_file():
                try:
                    evaluation = json.loads(results.read_text()).get("models")
                except (OSError, json.JSONDecodeError):
                    pass
        if base is None:
            base = run.base_model
    else:
        stages = [{"name": n, "kind": "unknown", "adapter": bool(content.spec.adapters)} for n in content.spec.stage_names]
    warnings = list((content.merge_info or {}).get("warnings", []))
    if content.spec.adapters and Path(content.spec.base).expanduser().exists():
        warnings.append(f"the base model is a local folder ({content.spec.base}) that this package does not "
                        "contain: whoever loads the adapter needs the same base weights (or package the merged model)")
    if content.spec.quantized_training and content.spec.adapters:
        warnings.append("the adapter was trained on a 4-bit (QLoRA) base; load the base in 4-bit "
                        "(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')) to reproduce the "
                        "trained model exactly")
    meta = {
        "format": PACKAGE_FORMAT,
        "name": name,
        # When the model was made (not when it was packaged), so the same model packs to the same bytes.
        "model_created": _model_time(content),
        "content": content.kind,
        "model_dir": "model",
        "base_model": base,
        "adapters": content.adapters,
        "stages": stages,
        "config": config,
        "datasets": sorted(set(datasets)),
        "data_fingerprints": fingerprints,
        "metrics": metrics,
        "evaluation": evaluation,
        "merge": content.merge_info,
        "versions": {"training": (run.data.get("versions") if run is not None else None) or {},
                     "packaging": package_versions()},
        "warnings": warnings,
    }

    return redact(meta)


def _model_time(content: Content) -> str | None:
    if content.run is not None and content.run.data.get("finished"):
        return str(content.run.data["finished"])
    times = [p.stat().st_mtime for _, p in content.files]
    if not times:
        return None
    return _dt.datetime.fromtimestamp(max(times), _dt.timezone.utc).isoformat(timespec="seconds")


def requirements(meta: dict) -> str:
    v = dict(meta["versions"]["packaging"])
    v.update({k: x for k, x in (meta["versions"].get("training") or {}).items() if x})
    needed = ["torch", "transformers", "accelerate", "safetensors"]
    if meta["content"] in ("adapter", "adapter_chain"):
        needed.insert(2, "peft")
    lines = ["# Packages that load this model; the versions it was trained and packaged with are the floors."]
    for n in needed:
        ver = v.get(n)
        ver = ver.split("+")[0] if ver else None  # drop local tags such as +cpu / +cu126
        lines.append(f"{n}>={ver}" if ver else n)
    if any((s.get("hyperparameters") or {}).get("use_4bit") for s in meta.get("stages", [])):
        lines.append("bitsandbytes  # only to load the base in 4-bit as in training (GPU)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- archive


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # deterministic archive: same content, same bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(archive: Path, top: str, small: dict[str, bytes], files: list[tuple[str, Path]],
                  compress_level: int = 6) -> str:
    """Write the .tar.gz (small in-memory files first, then model files, sorted); returns its sha256."""
    tmp = outputs.unique_temp(archive)
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=compress_level) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(small):
            data = small[name]
            tar.addfile(_tarinfo(f"{top}/{name}", len(data)), io.BytesIO(data))
        for name, path in sorted(files):
            with open(path, "rb") as f:
                tar.addfile(_tarinfo(f"{top}/{name}", path.stat().st_size), f)
    os.replace(tmp, archive)
    digest = file_sha256(archive)
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")
    return digest


def member_problem(member: tarfile.TarInfo, top: str | None = None) -> str | None:
    """Why a member is unsafe to extract (None when it is safe)."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or PurePosixPath(name).is_absolute():
        return f"`{name}` has an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return f"`{name}` climbs out of the extraction folder (`..`)"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return f"`{name}` is a device file or FIFO"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in PurePosixPath(target).parts:
            return f"`{name}` is a link pointing outside the package ({target})"
        return f"`{name}` is a link ({target}); packages hold regular files only"
    if not (member.isfile() or member.isdir()):
        return f"`{name}` is not a regular file"
    if top is not None and parts and parts[0] != top:
        return f"`{name}` is outside the package folder `{top}/`"
    return None


def verify_archive(archive: str | Path) -> VerifyReport:
    """Re-hash every file in the archive against its metadata.json (nothing is extracted)."""
    archive = Path(archive)
    problems: list[str] = []
    hashes: dict[str, tuple[str, int]] = {}
    meta_bytes = None
    top = None
    if not archive.is_file():
        raise UserError(f"archive `{archive}` not found")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                if top is None:
                    top = PurePosixPath(m.name).parts[0] if PurePosixPath(m.name).parts else ""
                bad = member_problem(m, top)
                if bad:
                    problems.append(f"unsafe member: {bad}")
                    continue
                if not m.isfile():
                    continue
                rel = PurePosixPath(m.name).relative_to(top).as_posix()
                f = tar.extractfile(m)
                h = hashlib.sha256()
                data = bytearray() if rel == METADATA else None
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    if data is not None:
                        data += chunk
                if data is not None:
                    meta_bytes = bytes(data)
                else:
                    hashes[rel] = (h.hexdigest(), m.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # zlib.error is an Exception subclass raised through gzip as OSError/EOFError or BadGzipFile.
        problems.append(f"the archive is damaged or not a tar.gz: {e}")
        return VerifyReport(False, problems, len(hashes))
    except Exception as e:  # zlib.error and other decompression failures
        problems.append(f"the archive is damaged: {type(e).__name__}: {e}")
        return VerifyReport(False, problems, len(hashes))
    if meta_bytes is None:
        problems.append(f"no {METADATA} in the package: it was not made by lmpipeline package")
        return VerifyReport(False, problems, len(hashes))
    try:
        meta = json.loads(meta_bytes)
        listed = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(f"{METADATA} is unreadable: {e}")
        return VerifyReport(False, problems, len(hashes))
    for rel, want in sorted(listed.items()):
        got = hashes.get(rel)
        if got is None:
            problems.append(f"missing file: {rel}")
        elif got[0] != want.get("sha256"):
            problems.append(f"changed file: {rel} (sha256 {got[0][:12]}..., expected {str(want.get('sha256'))[:12]}...)")
        elif want.get("size") is not None and got[1] != want["size"]:
            problems.append(f"changed file: {rel} (size {got[1]}, expected {want['size']})")
    for rel in sorted(set(hashes) - set(listed)):
        problems.append(f"unlisted file: {rel}")
    return VerifyReport(not problems, problems, len(hashes), meta)


def extract_package(archive: str | Path, dest: str | Path, *, verify: bool = True) -> Path:
    """Extract a package after checking every member (and, by default, every hash); returns its folder."""
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        top = PurePosixPath(members[0].name).parts[0] if members else None
        bad = [p for p in (member_problem(m, top) for m in members) if p]
        if bad:
            raise UserError(f"refusing to extract {archive}: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
        if verify:
            report = verify_archive(archive)
            if not report.ok:
                raise UserError(f"refusing to extract {archive}: it fails verification\n{report.summary()}")
        dest.mkdir(parents=True, exist_ok=True)
        # Second guard: the stdlib "data" filter also refuses absolute paths, links out and devices.
        tar.extractall(dest, filter="data")
    return dest / (top or "")


# -------------------------------------------------------------------------------------------- hub


def hub_token() -> str:
    """HF_TOKEN from the environment (the only place a token is taken from), or a UserError."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("push_to_hub needs a Hugging Face write token in the HF_TOKEN environment variable",
                        key="push_to_hub",
                        hint="export HF_TOKEN=hf_... (read from the environment only; never written to any file)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError("push_to_hub is on but HF_HUB_OFFLINE is set", key="push_to_hub",
                        hint="unset HF_HUB_OFFLINE to upload, or set push_to_hub: false")
    return token


def push_to_hub(content: Content, folder: Path, repo_id: str, *, private: bool = True) -> str:
    """Upload model files (chains in subfolders), README.md and metadata.json in one commit."""
    token = hub_token()
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = []
    for arc, path in content.files:
        rel = PurePosixPath(arc).relative_to("model").as_posix()
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    for arc, data in content.generated.items():
        ops.append(CommitOperationAdd(path_in_repo=PurePosixPath(arc).relative_to("model").as_posix(),
                                      path_or_fileobj=data))
    for small in ("README.md", METADATA):
        ops.append(CommitOperationAdd(path_in_repo=small, path_or_fileobj=str(folder / small)))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=ops, commit_message="Upload model packaged by lmpipeline")
    except Exception as e:  # HfHubHTTPError, network errors: say which, never echo the token
        msg = str(e).replace(token, "***").splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"upload to {repo_id} failed: {msg}", key="hub_repo_id",
                        hint="check the repository id, the token's write permission and the network") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log.info("pushed to %s", url)
    return str(url)


# ------------------------------------------------------------------------------------------- gguf


def find_gguf_converter(configured: str | None = None) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: the configured path, else on PATH; None when absent."""
    if configured:
        p = Path(configured).expanduser()
        if not p.is_file():
            raise UserError(f"convert_hf_to_gguf.py not found at `{configured}`", key="llama_cpp_convert")
        return p
    for name in ("convert_hf_to_gguf.py", "convert_hf_to_gguf", "convert-hf-to-gguf.py"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def export_gguf(content: Content, out_file: Path, *, outtype: str = "f16", converter: str | None = None) -> dict:
    """Run the converter on full weights. Returns {"status": "written"|"skipped", ...} (never raises
    for a missing converter: the package itself is still useful)."""
    if content.kind in ("adapter", "adapter_chain"):
        msg = ("GGUF export needs full weights and this package holds a LoRA adapter: add a merge stage "
               "(or run `lmpipeline merge`) and package the merged model")
        log.warning(msg)
        return {"status": "skipped", "reason": msg}
    script = find_gguf_converter(converter)
    if script is None:
        msg = ("GGUF export skipped: llama.cpp's convert_hf_to_gguf.py was not found on PATH. Clone "
               "https://github.com/ggml-org/llama.cpp, pip install -r llama.cpp/requirements.txt, and set "
               "llama_cpp_convert: /path/to/llama.cpp/convert_hf_to_gguf.py")
        log.warning(msg)
        return {"status": "skipped", "reason": msg}
    cmd = [sys.executable, str(script), str(Path(content.spec.base)), "--outfile", str(out_file), "--outtype", outtype]
    log.info("GGUF: %s", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out_file.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise UserError(f"convert_hf_to_gguf.py failed (exit {r.returncode}):\n{tail}", key="gguf")
    return {"status": "written", "file": str(out_file), "sha256": file_sha256(out_file), "outtype": outtype}


# ------------------------------------------------------------------------------------------ build


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


def build_package(path: str | Path, output_dir: str | Path, config: PackageConfig | None = None, *,
                  base_model: str | None = None) -> PackageResult:
    """Make the package of PATH (run, stage, adapter or model folder) in `output_dir`."""
    cfg = config or PackageConfig()
    if cfg.push_to_hub:
        hub_token()  # a missing token fails now, not after minutes of hashing and compressing
    out = Path(output_dir)
    outputs.check_is_folder(out, key="--output-dir")
    content = select_content(path, cfg.source, base_model)
    out.mkdir(parents=True, exist_ok=True)
    if content.run is not None:
        default = f"{content.run.run_dir.resolve().name}-{content.spec.label}"
    else:
        p = Path(path).resolve()
        default = p.parent.name if p.name == "final" else p.name

    name = _safe_name(redact(cfg.model_name or default))
    folder = out / name
    outputs.check_is_folder(folder, key="--output-dir")
    folder.mkdir(parents=True, exist_ok=True)

    meta = redact(collect_metadata(content, name))
    card = redact(render_card(meta, tags=cfg.tags, license=cfg.license or _base_license(meta.get("base_model")),
                              description=cfg.description, hub_repo_id=cfg.hub_repo_id if cfg.push_to_hub else None))
    small = {"README.md": card.encode(), "requirements.txt": requirements(meta).encode(), **content.generated}
    files = {}
    for arc, p in content.files:
        files[arc] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    for n, data in small.items():
        files[n] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    meta["files"] = dict(sorted(files.items()))
    small[METADATA] = json.dumps(meta, indent=2, ensure_ascii=False, default=str).encode()
    for n, data in small.items():
        if n in content.generated:
            continue  # lives in the archive's model/ only
        (folder / n).write_bytes(data)

    archive = out / f"{name}.tar.gz"
    digest = write_archive(archive, name, small, content.files, cfg.compress_level)
    log.info("package written: %s (sha256 %s, %d files)", archive, digest, len(files) + 1)
    result = PackageResult(archive, digest, folder, meta)
    if cfg.gguf:
        result.gguf = export_gguf(content, out / f"{name}.gguf", outtype=cfg.gguf_outtype,
                                  converter=cfg.llama_cpp_convert)
    if cfg.push_to_hub:
        result.hub_url = push_to_hub(content, folder, cfg.hub_repo_id, private=cfg.hub_private)
    return result


def _base_license(base: str | None) -> str | None:
    """The `license:` of a local base model's own README front matter, if any."""
    if not base:
        return None
    readme = Path(base).expanduser() / "README.md"
    if not readme.is_file():
        return None
    import yaml

    text = readme.read_text(errors="replace")
    m = re.match(r"^---\n(.*?)\n---", text, flags=re.S)
    if not m:
        return None
    try:
        fm = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = fm.get("license") if isinstance(fm, dict) else None
    return str(lic) if lic else None


class PackageStage:
    """`PackageStage(PackageConfig).execute(ctx)` -> StageResult; the archive is in <stage dir>."""

    def __init__(self, config: PackageConfig):
        if not isinstance(config, PackageConfig):
            raise TypeError(f"PackageStage needs a PackageConfig, got {type(config).__name__}")
        self.config = config

    def execute(self, ctx: RunContext) -> StageResult:
        cfg = self.config
        name = cfg.stage_name or "package"
        out = Path(cfg.output_dir) if cfg.output_dir else Path(ctx.run_dir) / name
        if (Path(ctx.run_dir) / RUN_FILE).is_file():
            source = ctx.run_dir
        else:
            latest = ctx.latest_model()
            if latest is None or latest.final_dir is None:
                raise UserError("nothing to package: no stage produced a model before this one")
            source = latest.final_dir
        result = build_package(source, out, cfg, base_model=None)
        notes = {"archive": str(result.archive), "sha256": result.sha256, "content": result.metadata["content"]}
        if result.hub_url:
            notes["hub_url"] = result.hub_url
        if result.gguf:
            notes["gguf"] = result.gguf
        return StageResult(name, out, None, notes=notes)


__all__ = ["build_package", "verify_archive", "extract_package", "push_to_hub", "export_gguf",
           "find_gguf_converter", "PackageStage", "PackageResult", "VerifyReport", "select_content"]
