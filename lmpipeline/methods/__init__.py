"""The training methods: one module each, listed once here.

`METHODS` is the one table of methods. Each entry is the `METHOD` a method module declares
(lmpipeline/methods/method.py says what a Method holds); everything else in lmpipeline looks a
method up here (`method_for`) instead of comparing its name.
"""

from __future__ import annotations

from lmpipeline.config.schema import STAGE_ALIASES, register_stage_kind
from lmpipeline.methods import dpo, kto, orpo, rm, sft
from lmpipeline.methods.method import EstimatorTerms, InspectView, Method

METHODS: tuple[Method, ...] = (sft.METHOD, dpo.METHOD, kto.METHOD, orpo.METHOD, rm.METHOD)
BY_KIND: dict[str, Method] = {m.name: m for m in METHODS}

for _m in METHODS:
    register_stage_kind(_m.name, _m.names, _m.config_class, trains=True)


def method_for(kind_or_stage_name: str) -> Method | None:
    """The method a stage kind (or a stage name such as `trl_sft`) selects; None for eval/merge/package."""
    return BY_KIND.get(STAGE_ALIASES.get(kind_or_stage_name, kind_or_stage_name))


def makes_causal_lm(kind: str) -> bool:
    """Whether a stage of this kind leaves a causal LM (what eval, generate and merge load); True for the
    stages that are not methods (a merge leaves one)."""
    method = method_for(kind)
    return method is None or method.model_class == "AutoModelForCausalLM"


def method_of_config(cfg) -> Method:
    """The method whose config class `cfg` is (the most specific one: a subclass wins)."""
    for m in sorted(METHODS, key=lambda m: -len(type.mro(m.config_class))):
        if isinstance(cfg, m.config_class):
            return m
    raise TypeError(f"{type(cfg).__name__} is not the config of a training method")


__all__ = ["METHODS", "Method", "EstimatorTerms", "InspectView", "method_for", "method_of_config", "makes_causal_lm"]
