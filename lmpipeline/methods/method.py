"""What a training method declares about itself: the seam between a method and the rest of lmpipeline.

A method is one module under lmpipeline/methods/ that ends with a `METHOD = Method(...)` and is
listed once in `lmpipeline/methods/__init__.py` (`METHODS`). Everything outside that module (the
pipeline, the config loader, the estimator and auto-fit, `validate`, `data inspect`, the report and
the model card) asks the Method instead of comparing method names:

    name, aliases      the stage kind in `stages:` and the other names that select it
    title              how the model card and messages name it ("supervised fine-tuning (SFT)")
    card_keys          its own config keys a model card lists (beside the common training ones)
    model_class        the transformers Auto class its final folder loads with (a causal LM unless told),
    model_kwargs       and the further from_pretrained arguments the model card's code passes (may read `tokenizer`)
    usage_example      what the model card's loading code then does (None: generate a reply)
    config_class       its typed config (the common TrainStageConfig plus its own fields)
    stage              `stage(config).execute(...)`: the training-stage lifecycle for this method
    data               which family of data formats it reads ("supervised", "preference" or "unpaired";
                       the data layer's `formats.format_kind` speaks the same names)
    start              where it starts after an earlier stage: "continue" (load the previous model as it
                       is, an adapter keeps training) or "chain" (the previous adapters merged or stacked
                       under a fresh one, the way preference methods keep their reference)
    reference          the reference model a config of it needs: "none", "adapter_disabled",
                       "frozen_copy" or "precomputed" (the estimator plans its memory and passes)
    terms              its memory and FLOP terms for the estimator (plan/estimate.EstimatorTerms)
    inspect            its tokenised training items for `lmpipeline data inspect` (`InspectView`)
    validate_data      reads (and tokenises) its data leniently for `lmpipeline validate`, so that every
                       problem is listed: (formats read, the data report)

Methods are plain data: composition, one explicit table, no plugin discovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmpipeline.plan.estimate import EstimatorTerms


@dataclass
class InspectView:
    """What `data inspect` shows of a stage: each item as its labelled token rows (an SFT example is one
    row, a preference pair two: chosen and rejected), the token length of every item, a summary line."""

    items: list[tuple[str, str, list[tuple[str, Any]]]]  # (source, note, [(label, TokenizedExample), ...])
    lengths: list[int]
    summary: str = ""
    data: Any = None  # the method's own data object (SFT's packed view reads it)
    header: str = ""  # printed first: which tokens the method trains


@dataclass(frozen=True)
class Method:
    name: str
    aliases: tuple[str, ...]
    config_class: type
    stage: type
    summary: str
    data: str
    start: str
    reference: Callable[[Any], str]
    terms: EstimatorTerms
    inspect: Callable[..., int]
    validate_data: Callable[..., Any]
    title: str = ""
    card_keys: tuple[str, ...] = ()
    model_class: str = "AutoModelForCausalLM"
    model_kwargs: str = ""
    usage_example: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def reference_for(self, cfg) -> str:
        """The reference a config of this method runs with ("none" when the method or its loss has none)."""
        return self.reference(cfg)


def no_reference(cfg) -> str:
    """For methods that never compare with a reference model (SFT, ORPO, reward models)."""
    return "none"
