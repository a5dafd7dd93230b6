"""Find, load and run a trained model: the shared inference layer of eval, generate, chat and merge.

What a PATH may be (`resolve_model`):
    a run folder (run.json inside)   the latest stage that produced a model (sft, dpo, merge)
    <run>/<stage> or <run>/<stage>/final   that stage's model
    a PEFT adapter folder            adapter_config.json names its base (base_model_name_or_path)
    a full model folder or Hub id    loaded as is

Adapter chains. A stage that trained an adapter on top of an earlier stage's adapter (DPO after a
LoRA SFT, whether it merged the SFT adapter into its base or stacked a new one on it) depends on that
earlier adapter too: run.json records, per stage, the model it started from ("model"), and a start
that is an earlier stage's final folder links the two. The chain is applied in order, each adapter
merged into the weights before the next is loaded; LoRA deltas on the same weights add, so this is
the trained model in both the "merge" and the "stack" case. Outside a run folder, an adapter whose
base_model_name_or_path is itself an adapter folder is followed the same way. Stage folders recorded
with paths that no longer exist (a run folder moved or copied) are found again as <run>/<stage>/final.

Loading (`load_spec`, `load_for_inference`): the base in the requested dtype (auto: bfloat16 on a GPU
that supports it, else float32; never 4-bit: inference runs the adapter on full-precision weights;
on GPUs with device_map="auto", so a model larger than one GPU is spread over several),
then the adapters; the last one stays unmerged unless asked, so evaluation runs the adapter exactly
as trained. The tokenizer (and its chat template) comes from the last stage's folder.

Generation (`generate_batch`): greedy by default, through lmpipeline.generation's engine (batch_size
slots refilled as answers finish), stopping at eos or the template's end-of-turn token.

Raises UserError for a path that is not a model, a run without a finished model stage, a base that
cannot be loaded (offline Hub id: pass base_model), unreadable prompt files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lmpipeline.context import RUN_FILE
from lmpipeline.errors import UserError
from lmpipeline.models.adapter_chain import ADAPTER_CONFIG, CHAIN_FILE, adapter_base, is_adapter, read_chain

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


# --------------------------------------------------------------------------------------- run.json


@dataclass
class StageInfo:
    """One stage of run.json, with its final folder found on this machine."""

    name: str
    kind: str
    status: str
    final_dir: Path | None
    adapter: bool
    start: str | None  # the model the stage started from, as recorded
    entry: dict

    @property
    def trained(self) -> bool:
        """A training stage (merge leaves a model too, but trains nothing). run.json records it; older run
        records are told by the step count only training stages write."""
        return bool(self.entry.get("trained", "global_step" in self.entry))


@dataclass
class RunInfo:
    run_dir: Path
    data: dict
    stages: list[StageInfo]

    @property
    def base_model(self) -> str | None:
        cfg = self.data.get("config") or {}
        return cfg.get("model_name_or_path")

    def stage(self, name: str) -> StageInfo:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"run {self.run_dir} has no stage `{name}`; it has: {', '.join(s.name for s in self.stages) or 'none'}")

    def stage_config(self, name: str) -> dict:
        return dict(((self.data.get("config") or {}).get("stage_configs") or {}).get(name) or {})

    def model_stages(self, *, trained_only: bool = False) -> list[StageInfo]:
        """Finished stages whose model folder exists (training stages and merges; only the training
        stages with trained_only), in run order."""
        return [s for s in self.stages if s.status == "done" and s.final_dir is not None
                and (s.trained or not trained_only)]


def read_run(run_dir: str | Path) -> RunInfo:
    """Parse run.json and locate every stage's final folder (recorded path, else <run>/<stage>/final)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} holds no {RUN_FILE}: not a run folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    stages = []
    for name, entry in (data.get("stages") or {}).items():
        final = None
        recorded = entry.get("final_dir")
        # Relative paths are the run's own folders (a copied run uses its own files); an absolute one
        # (older run.json) loses to this run folder's own <stage>/final when that exists.
        own = [run_dir / recorded] if recorded and recorded != "None" and not Path(recorded).is_absolute() else []
        for cand in own + [run_dir / name / "final"] + ([Path(recorded)] if recorded and recorded != "None" else []):
            if cand.is_dir():
                final = cand
                break
        adapter = bool(entry.get("adapter")) if "adapter" in entry else bool(final and (final / ADAPTER_CONFIG).exists())
        stages.append(StageInfo(name, entry.get("kind", ""), entry.get("status", "done"), final, adapter,
                                entry.get("model"), entry))
    return RunInfo(run_dir, data, stages)


def find_run_dir(path: Path) -> tuple[Path, str | None] | None:
    """(run folder, stage name or None) when `path` is a run folder, a stage folder or its final/."""
    if (path / RUN_FILE).is_file():
        return path, None
    if (path.parent / RUN_FILE).is_file():
        return path.parent, path.name
    if path.name == "final" and (path.parent.parent / RUN_FILE).is_file():
        return path.parent.parent, path.parent.name
    return None


# ------------------------------------------------------------------------------------ resolution


@dataclass
class ModelSpec:
    """How to build a model: load `base` (full weights), then apply `adapters` in order."""

    base: str
    adapters: list[Path] = field(default_factory=list)
    tokenizer: str | None = None
    label: str = "model"
    stage_names: list[str] = field(default_factory=list)
    # True when an adapter of the chain was trained on a 4/8-bit base; None when unknown.
    quantized_training: bool | None = None

    def describe(self) -> dict:
        return {"label": self.label, "base": self.base, "adapters": [str(a) for a in self.adapters],
                "stages": self.stage_names, "quantized_training": self.quantized_training}


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def resolve_in_run(run: RunInfo, stage: str | None = None, base_model: str | None = None) -> ModelSpec:
    """The ModelSpec of `stage` (default: the latest model-producing stage) of a run."""
    if stage is None:
        done = run.model_stages()
        if not done:
            raise UserError(f"run {run.run_dir} has no finished stage with a model (sft, dpo or merge)",
                            hint="run training first, or point at a model folder")
        info = done[-1]
    else:
        info = run.stage(stage)
        if info.final_dir is None:
            raise UserError(f"stage `{stage}` of {run.run_dir} has no model folder (status {info.status}, "
                            f"kind {info.kind or 'unknown'})")
    spec = _chain_in_run(run, info, base_model, seen=set())
    spec.label = info.name
    return spec


def _chain_in_run(run: RunInfo, info: StageInfo, base_model: str | None, seen: set) -> ModelSpec:
    if info.name in seen:
        raise UserError(f"run.json of {run.run_dir}: stage `{info.name}` starts from itself")
    seen.add(info.name)
    assert info.final_dir is not None
    quant = bool(run.stage_config(info.name).get("use_4bit") or run.stage_config(info.name).get("use_8bit"))
    if info.kind == "merge" or not (info.adapter and is_adapter(info.final_dir)):
        return ModelSpec(base=str(info.final_dir), tokenizer=str(info.final_dir), stage_names=[info.name],
                         quantized_training=False)
    chained = read_chain_file(info.final_dir)
    if chained is not None:
        chained.base = _root(run, chained.base, base_model)
        chained.quantized_training = any(bool(run.stage_config(n).get("use_4bit") or run.stage_config(n).get("use_8bit"))
                                         for n in chained.stage_names)
        return chained
    parent = _parent_stage(run, info)
    if parent is not None:
        spec = _chain_in_run(run, parent, base_model, seen)
        spec.quantized_training = bool(spec.quantized_training) or quant
    else:
        recorded = (info.start if info.start and not _looks_like_stage_path(info.start) else None) \
            or run.base_model or adapter_base(info.final_dir)
        root = _root(run, recorded, base_model)
        if not root:
            raise UserError(f"cannot tell the base model of {info.final_dir}", hint="pass --base-model")
        spec = ModelSpec(base=root, quantized_training=quant)
    spec.adapters.append(info.final_dir)
    spec.stage_names.append(info.name)
    spec.tokenizer = str(info.final_dir) if _has_tokenizer(info.final_dir) else (spec.tokenizer or spec.base)
    return spec


def _root(run: RunInfo, recorded: str | None, base_model: str | None) -> str | None:
    """The weights a chain starts from: a full-weights stage of this run (found again if the run
    moved), else the base model, which `base_model` overrides (e.g. a local copy of a Hub model)."""
    if recorded:
        for s in run.stages:
            if s.final_dir is not None and recorded in (s.entry.get("final_dir"), str(s.final_dir)):
                return str(s.final_dir)
        if _looks_like_stage_path(recorded) and not Path(recorded).exists():
            name = Path(recorded).parent.name
            for s in run.stages:
                if s.name == name and s.final_dir is not None:
                    return str(s.final_dir)
    return base_model or recorded


def _looks_like_stage_path(start: str) -> bool:
    return Path(start).name == "final"


def _parent_stage(run: RunInfo, info: StageInfo) -> StageInfo | None:
    earlier = run.stages[: run.stages.index(info)]
    if info.start:
        for s in reversed(earlier):
            recorded = s.entry.get("final_dir")
            if s.final_dir is not None and info.start in (recorded, str(s.final_dir), s.entry.get("next_model")):
                return s
        if _looks_like_stage_path(info.start):
            # Recorded under a path that moved: <old run>/<stage>/final; match by stage name.
            name = Path(info.start).parent.name
            for s in earlier:
                if s.name == name and s.final_dir is not None:
                    return s
        return None
    # Older run.json without "model": the pipeline chains each stage to the previous model stage.
    for s in reversed(earlier):
        if s.final_dir is not None and s.status == "done":
            return s
    return None


def resolve_model(path: str | Path, base_model: str | None = None) -> ModelSpec:
    """A ModelSpec for any PATH (see the module docstring). Hub ids pass through untouched."""
    p = Path(path).expanduser()
    if not p.exists():
        if str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
            raise UserError(f"model path `{path}` does not exist")
        return ModelSpec(base=str(path), tokenizer=str(path), label=str(path))
    package = _package_spec(p, base_model)
    if package is not None:
        return package
    found = find_run_dir(p)
    if found is not None:
        run_dir, stage = found
        run = read_run(run_dir)
        if stage is None or any(s.name == stage for s in run.stages):
            return resolve_in_run(run, stage, base_model)
    if is_adapter(p):
        spec = _chain_of_adapter(p, base_model, depth=0)
        spec.label = p.name if p.name != "final" else p.parent.name
        return spec
    if not (p / "config.json").is_file():
        raise UserError(f"`{path}` is neither a run folder, an adapter folder nor a model folder "
                        "(no run.json, adapter_config.json or config.json inside)")
    return ModelSpec(base=str(p), tokenizer=str(p), label=p.name)


def _package_spec(folder: Path, base_model: str | None) -> ModelSpec | None:
    """The model of an extracted `lmpipeline package` folder (metadata.json says what it holds)."""
    meta_file = folder / "metadata.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not str(meta.get("format", "")).startswith("lmpipeline-package/"):
        return None
    model_dir = folder / meta.get("model_dir", "model")
    content = meta.get("content")
    if content in ("merged", "full"):
        return ModelSpec(base=str(model_dir), tokenizer=str(model_dir), label=folder.name)
    adapters = [model_dir / a["folder"] if a.get("folder") != "model" else model_dir for a in meta.get("adapters", [])]
    root = base_model or meta.get("base_model")
    if not adapters or not root:
        raise UserError(f"{meta_file} lists no adapters or no base model", hint="pass --base-model")
    return ModelSpec(base=root, adapters=adapters, tokenizer=str(adapters[-1]), label=folder.name,
                     stage_names=[a.get("stage", "adapter") for a in meta.get("adapters", [])])


def read_chain_file(adapter: Path, base_model: str | None = None) -> ModelSpec | None:
    """The ModelSpec an adapter's lmpipeline_chain.json describes (None when it has none)."""
    chain = read_chain(adapter)
    if chain is None:
        return None
    recorded_base, adapters, stages = chain
    names = [stage or found.name for stage, found in zip(stages, adapters)]
    root = base_model or recorded_base or adapter_base(adapter)
    if not root:
        raise UserError(f"{adapter / CHAIN_FILE} names no base model", hint="pass --base-model")
    return ModelSpec(base=root, adapters=adapters, tokenizer=str(adapter) if _has_tokenizer(adapter) else root,
                     label=names[-1], stage_names=names)


def _chain_of_adapter(adapter: Path, base_model: str | None, depth: int) -> ModelSpec:
    chained = read_chain_file(adapter, base_model)
    if chained is not None:
        return chained
    if depth > 16:
        raise UserError(f"adapter chain at {adapter} is longer than 16: a loop in base_model_name_or_path?")
    parent = adapter_base(adapter)
    parent_path = Path(parent).expanduser() if parent else None
    if parent_path is not None and parent_path.is_dir() and is_adapter(parent_path):
        spec = _chain_of_adapter(parent_path, base_model, depth + 1)
    else:
        root = base_model or parent
        if not root:
            raise UserError(f"{adapter / ADAPTER_CONFIG} names no base model", hint="pass --base-model")
        spec = ModelSpec(base=root)
    spec.adapters.append(adapter)
    spec.stage_names.append(adapter.name)
    spec.tokenizer = str(adapter) if _has_tokenizer(adapter) else (spec.tokenizer or spec.base)
    return spec


def spec_from_completed(completed: Sequence, base_model: str) -> ModelSpec:
    """The ModelSpec of the last of `completed` (RunContext.completed entries) when no run.json is at hand.

    As the pipeline chains stages, each adapter stage builds on the model stage before it; a stage with
    full weights starts a new chain.
    """
    chain: list[Path] = []
    base, names = base_model, []
    for s in completed:
        if s.final_dir is None:
            continue
        if s.adapter:
            chain.append(Path(s.final_dir))
            names.append(s.name)
        else:
            base, chain, names = str(s.final_dir), [], [s.name]
    if not names:
        raise UserError("no finished stage with a model before this one")
    last = Path(chain[-1]) if chain else Path(base)
    return ModelSpec(base=base, adapters=chain, tokenizer=str(last) if _has_tokenizer(last) else base,
                     label=names[-1], stage_names=names)


def spec_for_context(ctx, stage: str | None = None, base_model: str | None = None) -> ModelSpec:
    """The model a lifecycle stage works on: `stage` (default the latest model stage) of the run."""
    run_file = Path(ctx.run_dir) / RUN_FILE
    if run_file.is_file():
        run = read_run(ctx.run_dir)
        if stage is not None or run.model_stages():
            return resolve_in_run(run, stage, base_model)
    completed = list(ctx.completed)
    if stage is not None:
        idx = [i for i, s in enumerate(completed) if s.name == stage]
        if not idx:
            raise UserError(f"no finished stage named `{stage}`")
        completed = completed[: idx[-1] + 1]
    spec = spec_from_completed(completed, base_model or ctx.base_model)
    return spec


# --------------------------------------------------------------------------------------- loading


def inference_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(dtype: str = "auto", device: str | None = None):
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto":
        if dtype not in names:
            raise UserError(f"unknown dtype `{dtype}`; choose from auto, {', '.join(names)}", key="dtype")
        return names[dtype]
    if inference_device(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # Half precision on CPU is slow and loses accuracy for no memory a CPU run needs.
    return torch.float32


def load_base(name: str, dtype, *, trust_remote_code: bool = False, device_map=None,
              allow_pickle_weights: bool = False):
    """Full-precision base weights (a 4-bit-trained adapter is run on unquantised weights).

    device_map goes to from_pretrained: None loads on the CPU; "auto" spreads a large model over the
    visible GPUs (and CPU memory if it must) without first building it in host memory. Pickle weights
    only with allow_pickle_weights, as in training (models/loading.pickle_policy).
    """
    import pickle

    from transformers import AutoModelForCausalLM

    from lmpipeline.models.loading import pickle_policy

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code,
              **pickle_policy(name, allowed=allow_pickle_weights, key="allow_pickle_weights")}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # the last: a pickle torch's weights_only refuses
        raise UserError(f"cannot load the base model `{name}`: {str(e).splitlines()[0]}",
                        hint="if it is a Hub id and this machine is offline, pass --base-model LOCAL_FOLDER") from None


def apply_adapters(model, adapters: Sequence[Path], *, merge_last: bool):
    """Load each adapter on `model` in order; all but the last are merged (the last too if asked)."""
    from peft import PeftModel

    for i, adapter in enumerate(adapters):
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"cannot load adapter {adapter} on its base: {str(e).splitlines()[0]}",
                            hint="the adapter must have been trained on this base model (check --base-model)") from None
        if i < len(adapters) - 1 or merge_last:
            model = model.merge_and_unload()
    return model


def load_tokenizer_for(spec: ModelSpec, *, trust_remote_code: bool = False):
    from lmpipeline.models.loading import load_tokenizer

    return load_tokenizer(spec.tokenizer or spec.base, trust_remote_code=trust_remote_code)


def load_spec(spec: ModelSpec, *, dtype: str = "auto", device: str | None = None, merge_last: bool = False,
              trust_remote_code: bool = False, tokenizer=None, allow_pickle_weights: bool = False):
    """(model, tokenizer) for a ModelSpec, in eval mode on `device` (`tokenizer`: reuse one already loaded)."""
    device = inference_device(device)
    torch_dtype = inference_dtype(dtype, device)
    t0 = time.perf_counter()
    model = load_base(spec.base, torch_dtype, trust_remote_code=trust_remote_code,
                      device_map="auto" if device.startswith("cuda") else None,
                      allow_pickle_weights=allow_pickle_weights)
    model = apply_adapters(model, spec.adapters, merge_last=merge_last)
    if not getattr(model, "hf_device_map", None):  # a dispatched model is already where it runs
        model.to(device)
    model.eval()
    if tokenizer is None:
        tokenizer = load_tokenizer_for(spec, trust_remote_code=trust_remote_code)
    log.info("loaded %s (base %s%s) in %.1fs on %s, %s", spec.label, spec.base,
             f" + {len(spec.adapters)} adapter(s)" if spec.adapters else "", time.perf_counter() - t0, device,
             str(torch_dtype).removeprefix("torch."))
    return model, tokenizer


def load_for_inference(path: str | Path, base_model: str | None = None, dtype: str = "auto", *,
                       device: str | None = None, merge_last: bool = False, trust_remote_code: bool = False,
                       allow_pickle_weights: bool = False):
    """(model, tokenizer) for a run folder, stage folder, adapter folder, model folder or Hub id."""
    return load_spec(resolve_model(path, base_model), dtype=dtype, device=device, merge_last=merge_last,
                     trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)


# --------------------------------------------------------------------------------------- prompts


@dataclass
class PromptRow:
    """One prompt to generate for: raw text or messages (ending with the user turn), and a reference."""

    prompt: str | list[dict]
    reference: str | None
    source: str
    row: dict


def read_prompts(path: str | Path, *, max_samples: int | None = None, system_prompt: str | None = None,
                 key: str = "golden_set") -> list[PromptRow]:
    """Prompts from JSONL/JSON/CSV/Parquet rows.

    Accepted rows: {"prompt": str | messages, "reference"?: str}; MT-Bench's {"turns": [...]} (first
    turn); or any SFT format of lmpipeline.data.formats (alpaca, messages, sharegpt, ...), whose last
    assistant turn becomes the reference and everything before it the prompt.
    """
    from lmpipeline.data import formats, readers
    from lmpipeline.data.types import ChatExample, CompletionExample, DataError

    try:
        rows = list(readers.read_rows(str(path)))
    except DataError as e:
        raise UserError(str(e), key=key) from None
    bad = [(s, r) for s, r in rows if not isinstance(r, dict)]
    if bad:
        raise UserError(f"{len(bad)} unreadable row(s); first: {bad[0][1]}", key=key)
    records = [(str(s), r) for s, r in rows]
    if not records:
        raise UserError(f"`{path}` holds no rows", key=key)
    out: list[PromptRow] = []
    native = all("prompt" in r and not {"completion", "chosen", "rejected"} & set(r) for _, r in records)
    if native or all("turns" in r for _, r in records):
        for src, r in records:
            out.append(_native_prompt(src, r, key))
    else:
        try:
            fmt = formats.detect_format([r for _, r in records])
        except DataError as e:
            raise UserError(f"`{path}`: {e.reason}", key=key,
                            hint='golden rows are {"prompt": ..., "reference": ...} or any SFT format') from None
        for (src, r), (source, _) in zip(records, rows):
            try:
                ex = formats.convert_row(r, fmt, source)
            except DataError as e:
                raise UserError(str(e), key=key) from None
            if isinstance(ex, ChatExample):
                out.append(_split_conversation(ex.messages, src, r))
            elif isinstance(ex, CompletionExample):
                out.append(PromptRow(ex.prompt, ex.completion, src, r))
            else:
                raise UserError(f"{src}: {type(ex).__name__} rows (format {fmt}) hold no prompt to generate for",
                                key=key, hint="use prompt/reference rows or a chat/instruction format")
    if system_prompt:
        out = [_with_system(p, system_prompt) for p in out]
    return out[:max_samples] if max_samples else out


def _native_prompt(src: str, r: dict, key: str) -> PromptRow:
    if "turns" in r and "prompt" not in r:
        turns = r["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise UserError(f"{src}: `turns` must be a list of strings", key=key)
        ref = r.get("reference")
        return PromptRow(turns[0], ref[0] if isinstance(ref, list) and ref else ref if isinstance(ref, str) else None, src, r)
    prompt, ref = r["prompt"], r.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise UserError(f"{src}: `reference` must be a string, found {type(ref).__name__}", key=key)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{src}: empty prompt", key=key)
        return PromptRow(prompt, ref, src, r)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if prompt[-1]["role"] == "assistant":
            row = _split_conversation(prompt, src, r)
            return PromptRow(row.prompt, ref if ref is not None else row.reference, src, r)
        return PromptRow([dict(m) for m in prompt], ref, src, r)
    raise UserError(f"{src}: `prompt` must be a string or a list of {{role, content}} messages", key=key)


def _split_conversation(messages: list[dict], src: str, row: dict) -> PromptRow:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return PromptRow([dict(m) for m in messages], None, src, row)
    content = messages[last].get("content")
    return PromptRow([dict(m) for m in messages[:last]], content if isinstance(content, str) else None, src, row)


def _with_system(p: PromptRow, system: str) -> PromptRow:
    msgs = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else list(p.prompt)
    if msgs and msgs[0].get("role") == "system":
        return p
    return PromptRow([{"role": "system", "content": system}] + msgs, p.reference, p.source, p.row)


def prompt_text(prompt: str | list[dict]) -> str:
    """The last user message (what a person reads as "the prompt")."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# ------------------------------------------------------------------------------------ generation


def resolve_template(tokenizer, *, chat_template: str | None = None, chat_template_path: str | None = None,
                     required: bool = False) -> str | None:
    """The chat template to render prompts with: the one given, else the tokenizer's, else None."""
    from lmpipeline.data import templates
    from lmpipeline.data.types import DataError

    try:
        return templates.resolve_chat_template(tokenizer, chat_template_path=chat_template_path,
                                               chat_template=chat_template)
    except DataError as e:
        if required or chat_template or chat_template_path:
            raise UserError(e.reason, key="chat_template") from None
        return None


def render_prompt(tokenizer, template: str | None, prompt: str | list[dict]) -> str:
    """Prompt text ready for generation (template with the generation prompt, or raw text)."""
    from lmpipeline.data.templates import render
    from lmpipeline.data.types import DataError

    if template is None:
        if isinstance(prompt, str):
            return prompt
        raise UserError("these prompts are chat messages but the model has no chat template",
                        key="chat_template", hint="set chat_template (e.g. chatml) or give plain-text prompts")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return render(tokenizer, template, messages, add_generation_prompt=True)
    except DataError as e:
        raise UserError(f"cannot render a prompt with the chat template: {e.reason}", key="chat_template") from None


def stop_token_ids(tokenizer, template: str | None) -> list[int]:
    """eos plus the template's end-of-turn token when that is a single token (e.g. <|im_end|>)."""
    from lmpipeline.data.templates import end_of_turn_token

    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if template is not None:
        eot = end_of_turn_token(template, tokenizer)
        if eot:
            enc = tokenizer(eot, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
    return ids


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, the stop token included
    finished: bool  # stopped by eos / end of turn (False: cut at max_new_tokens)


def encode_prompt(tokenizer, template: str | None, prompt: str | list[dict]) -> list[int]:
    # Templates write BOS themselves; raw text gets the tokenizer's usual special tokens.
    text = render_prompt(tokenizer, template, prompt)
    return list(tokenizer(text, add_special_tokens=template is None)["input_ids"])


def sampling_params(tokenizer, template: str | None, *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), seed: int | None = None):
    """The engine's settings for answers to these prompts: greedy at temperature 0, ending at eos or
    the template's end-of-turn token (stop_token_ids)."""
    from lmpipeline.generation import SamplingParams

    sampled = temperature > 0
    return SamplingParams(temperature=temperature if sampled else 0.0, top_p=top_p if sampled else 1.0,
                          top_k=top_k if sampled else 0, max_new_tokens=max_new_tokens, stop=tuple(stop),
                          eos_ids=tuple(stop_token_ids(tokenizer, template)), seed=seed)


def generate_batch(model, tokenizer, prompts: Sequence[str | list[dict]], *, chat_template: str | None = None,
                   max_new_tokens: int = 256, batch_size: int = 8, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
                   seed: int | None = None, engine=None) -> list[Generation]:
    """Generate for every prompt with lmpipeline's engine (`batch_size` slots, refilled as answers
    finish); results in prompt order. `engine`: reuse one (its cache and captured graphs)."""
    from lmpipeline.generation import GenerationEngine, Request

    params = sampling_params(tokenizer, chat_template, max_new_tokens=max_new_tokens,
                             temperature=temperature if do_sample else 0.0, top_p=top_p, top_k=top_k,
                             stop=stop, seed=seed)
    requests = [Request(encode_prompt(tokenizer, chat_template, p), params) for p in prompts]
    engine = engine or GenerationEngine(model, tokenizer, max_slots=batch_size)
    return [Generation(c.text.strip(), len(c.token_ids), c.finished) for (c,) in engine.generate(requests)]


def release_memory() -> None:
    """Return freed model memory (call after `del model`): eval loads several models in turn."""
    import gc

    import torch

    if torch.cuda.is_available():
        # Only needed for the GPU caching allocator; on CPU reference counting already freed the weights.
        gc.collect()
        torch.cuda.empty_cache()


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))
