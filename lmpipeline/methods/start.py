"""Where a chained method's policy starts after an earlier stage, and the adapter chain it leaves.

    no previous stage       the base model (`model_name_or_path`), or an in-memory model.
    after SFT with LoRA     `from_previous_stage: merge` (default): load the base, load the SFT adapter,
                            merge it into the weights, add a fresh LoRA for this stage.
                            `stack`: keep the SFT adapter as a frozen adapter named "sft" and train a
                            second adapter "default" on top (both active in the policy).
                            A folder given as `model_name_or_path` that holds an adapter is treated
                            the same way (its adapter_config.json names the base).
    after full fine-tuning  that stage's final/ folder is the base.
    after a chained stage   its lmpipeline_chain.json is followed: every adapter in order.

An adapter trained over earlier ones is saved with the chain file (models/adapter_chain.py) naming the
base and every adapter in order, so evaluation, merge and package rebuild the trained model.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline.context import StageOutput
from lmpipeline.errors import UserError
from lmpipeline.methods.lifecycle import save_final
from lmpipeline.models import loading
from lmpipeline.models.adapter_chain import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHAIN_FILE,
    adapter_base,
    combinable,
    combine_lora,
    is_adapter,
    read_chain,
)

log = logging.getLogger(__name__)

# The name the earlier adapter keeps when a new one is stacked on it (from_previous_stage: stack).
STACK_REFERENCE_ADAPTER = "sft"
# Inside a chained stage's final folder (which holds the chain combined into one adapter): this stage's
# own adapter alone, the delta it trained over the earlier ones.
STAGE_ONLY_ADAPTER = "this_stage_only"


@dataclass
class StartPoint:
    base: str | None                      # weights to load (None: an in-memory model was given)
    merge: list[Path] = field(default_factory=list)   # adapters merged into the base, in order
    stack: Path | None = None            # adapter kept frozen under the new one (from_previous_stage: stack)
    stage_names: list[str | None] = field(default_factory=list)  # the stage that trained each chain adapter

    @property
    def chain(self) -> list[Path]:
        return self.merge + ([self.stack] if self.stack else [])

    def describe(self) -> str:
        if not self.chain:
            return "base model" if self.base else "model given in memory"
        if self.stack:
            return "sft adapter stacked (frozen) under a new adapter"
        return "sft merged into base"


def adapter_chain(final_dir: Path, name: str | None = None) -> tuple[str | None, list[Path], list[str | None]]:
    """(base model, adapters to apply in order, their stage names) that an adapter folder needs: its
    own chain file when it has one (a DPO adapter trained over SFT), else itself on the base it names.
    A chain entry's relative path wins; its absolute path is the fallback (a run folder moved)."""
    chain = read_chain(final_dir)
    if chain is None:
        return adapter_base(final_dir), [final_dir.resolve()], [name]
    return chain


def resolve_start(cfg, model_name_or_path: str | None, previous: StageOutput | None) -> StartPoint:
    if previous is not None and previous.final_dir is not None:
        final = Path(previous.final_dir)
        if not previous.adapter:
            return StartPoint(base=str(final))
        base, chain, names = adapter_chain(final, previous.name)
        base = model_name_or_path if model_name_or_path and not is_adapter(model_name_or_path) else base
    elif model_name_or_path and is_adapter(model_name_or_path):
        folder = Path(model_name_or_path)
        base, chain, names = adapter_chain(folder, folder.parent.name if folder.name == "final" else folder.name)
    else:
        return StartPoint(base=model_name_or_path)
    if not base:
        raise UserError(f"cannot tell the base model of adapter `{chain[-1]}` (adapter_config.json names none)",
                        key="model_name_or_path", hint="set model_name_or_path to the base model")
    if cfg.from_previous_stage == "stack":
        return StartPoint(base=base, merge=chain[:-1], stack=chain[-1], stage_names=names)
    return StartPoint(base=base, merge=chain, stage_names=names)


def load_start(start: StartPoint, cfg, torch_dtype: str):
    from peft import PeftModel

    loading.quantization_config(cfg)  # fails now, with the key, if QLoRA is asked for without a GPU
    model = loading.load_model(start.base, cfg, torch_dtype=torch_dtype)
    for adapter in start.merge:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            log.warning("merging %s into a quantised base re-quantises the merged weights (small rounding); "
                        "from_previous_stage: stack avoids it", adapter)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        log.info("merged adapter %s into the base", adapter)
    if start.stack is not None:
        model = PeftModel.from_pretrained(model, str(start.stack), adapter_name=STACK_REFERENCE_ADAPTER,
                                          is_trainable=False)
        log.info("stacked adapter %s (frozen, as %r)", start.stack, STACK_REFERENCE_ADAPTER)
    return model


def add_stacked_lora(model, cfg):
    """A trainable LoRA "default" on top of the frozen reference adapter; both active in the policy."""
    from peft import LoraConfig

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                        task_type="CAUSAL_LM", bias="none")
    model.add_adapter("default", config)
    model.active_adapter = "default"  # PeftModel reads its config by this name
    model.base_model.set_adapter([STACK_REFERENCE_ADAPTER, "default"])
    model.set_requires_grad(STACK_REFERENCE_ADAPTER, requires_grad=False)
    return model


def _provenance(folder: Path) -> list[str]:
    """The stages an adapter folder's model went through before its own (from its chain file)."""
    chain = Path(folder) / CHAIN_FILE
    if not chain.is_file():
        return []
    data = json.loads(chain.read_text())
    return [e.get("stage") for e in data.get("includes", [])] + [e.get("stage") for e in data.get("adapters", [])][:-1]


def write_combined(final_dir: Path, start: StartPoint, stage_name: str) -> Path:
    """The stage's adapter and the earlier ones it trained over, summed into one adapter in final_dir (so
    PeftModel.from_pretrained(base, final_dir) is the trained model, with any tool), this stage's own
    adapter kept in final_dir/STAGE_ONLY_ADAPTER, and a chain file that applies final_dir alone and says
    what it includes."""
    own = final_dir / STAGE_ONLY_ADAPTER
    own.mkdir(exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        os.replace(final_dir / name, own / name)
    combine_lora([*start.chain, own], final_dir)
    includes = [stage for p, name in zip(start.chain, start.stage_names) for stage in [*_provenance(p), name]]
    data = {
        "format": "lmpipeline-adapter-chain/1",
        "base_model": start.base,
        "adapters": [{"stage": stage_name, "path": ".", "abs_path": str(final_dir.resolve())}],
        "includes": [{"stage": name} for name in includes],
        "combined": f"this folder's adapter is the sum of the earlier stages' adapters and this stage's own "
                    f"({STAGE_ONLY_ADAPTER}/): load it on base_model with PeftModel.from_pretrained",
        "trained_as": "stack" if start.stack is not None else "merge",
    }
    path = final_dir / CHAIN_FILE
    path.write_text(json.dumps(data, indent=2))
    return path


def write_chain(final_dir: Path, start: StartPoint, stage_name: str) -> Path:
    """final/lmpipeline_chain.json: the base and the ordered adapters that make this stage's model."""
    entries = [{"stage": name, "path": os.path.relpath(p, final_dir), "abs_path": str(p)}
               for p, name in zip(start.chain, start.stage_names)]
    entries.append({"stage": stage_name, "path": ".", "abs_path": str(final_dir.resolve())})
    data = {
        "format": "lmpipeline-adapter-chain/1",
        "base_model": start.base,
        "adapters": entries,
        "apply": "load base_model, then for each adapter in order: PeftModel.from_pretrained + merge_and_unload "
                 "(LoRA deltas add, so merged and stacked give the same weights)",
        "trained_as": "stack" if start.stack is not None else "merge",
    }
    path = final_dir / CHAIN_FILE
    path.write_text(json.dumps(data, indent=2))
    return path


@contextmanager
def only_adapters(peft_model, names: list[str]):
    """Temporarily make only `names` active (peft's set_adapter also flips requires_grad: restore it).
    Called before the policy forward of a step, so no autograd graph sees the flip."""
    tuner = peft_model.base_model
    before = list(tuner.active_adapters)
    grads = [(p, p.requires_grad) for p in peft_model.parameters()]
    tuner.set_adapter(names)
    try:
        yield
    finally:
        tuner.set_adapter(before)
        for p, g in grads:
            p.requires_grad_(g)


class ChainedStart:
    """The start of a chained method's run, as one piece a recipe holds: the start point resolved from
    the previous stage (or a folder, or an in-memory model), the starting model loaded, the method's
    adapter added over it (fresh, or stacked on the frozen earlier one), and the final folder saved with
    the adapter chain that rebuilds the trained model."""

    def __init__(self, requested: str | None, previous: StageOutput | None, *, has_model: bool, key: str):
        self.requested = requested
        self.previous = previous
        self.has_model = has_model
        self.key = key  # "stage_configs.<stage>." for error messages
        self.point = StartPoint(base=None)

    @property
    def stacked(self) -> bool:
        return self.point.stack is not None

    def resolve(self, cfg, stage_class: str) -> None:
        """Find where the run starts; refuse what cannot work (before anything is loaded)."""
        if not self.has_model and self.requested is None and self.previous is None:
            raise UserError(f"{stage_class}.execute needs a model, model_name_or_path or a previous stage")
        if not self.has_model:
            self.point = resolve_start(cfg, self.requested, self.previous)
        if self.stacked and not cfg.use_lora:
            raise UserError("from_previous_stage: stack trains a second adapter and needs use_lora: true",
                            key=self.key + "from_previous_stage",
                            hint="use from_previous_stage: merge for full fine-tuning")

    def tokenizer_source(self, stage_class: str) -> str:
        if self.point.base is None:
            raise UserError(f"{stage_class}.execute: give the tokenizer with an in-memory model")
        return next((str(p) for p in reversed(self.point.chain) if (p / "tokenizer_config.json").exists()),
                    self.point.base)

    def load(self, model, cfg, torch_dtype: str):
        """The starting model: loaded with its chain, or the in-memory one (an adapter given in memory is
        merged: it becomes part of the start)."""
        if model is None:
            return load_start(self.point, cfg, torch_dtype)
        if hasattr(model, "peft_config"):
            if cfg.from_previous_stage == "stack":
                raise UserError("from_previous_stage: stack needs the earlier adapter on disk",
                                key=self.key + "from_previous_stage",
                                hint="pass previous= (or its folder as model_name_or_path), or use merge")
            model = model.merge_and_unload()
        return model

    def add_adapter(self, model, cfg):
        """The method's trainable LoRA: stacked on the frozen earlier adapter, or fresh on the start."""
        if not cfg.use_lora:
            return model
        return add_stacked_lora(model, cfg) if self.stacked else loading.apply_lora(model, cfg)

    def save(self, model, tokenizer, final_dir: Path, state_dict: dict | None, cfg, stage_name: str) -> None:
        if self.stacked and cfg.use_lora:
            # Only the new adapter: the earlier one is in the chain.
            save_final(model, tokenizer, final_dir, state_dict=state_dict, selected_adapters=["default"])
        else:
            save_final(model, tokenizer, final_dir, state_dict=state_dict)
        if self.point.chain and cfg.use_lora:
            why_not = combinable([*self.point.chain, final_dir])
            if why_not is None:
                write_combined(final_dir, self.point, stage_name)
            else:  # the chain file still rebuilds the model: each adapter merged in order
                log.info("[%s] final/ keeps this stage's adapter and the chain file (%s)", stage_name, why_not)
                write_chain(final_dir, self.point, stage_name)

    def notes(self) -> dict:
        return {"start": self.point.describe(), "base_model": self.point.base,
                "adapter_base_chain": [str(p) for p in self.point.chain]}
