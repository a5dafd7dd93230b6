"""What stages hand each other: a stage's result, and the run it belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The run record every run folder holds (written by pipeline.py, read by eval, merge, package, report).
RUN_FILE = "run.json"


@dataclass
class StageResult:
    """What a stage leaves behind: where its outputs are, and its final metrics."""

    stage_name: str
    output_dir: Path
    final_dir: Path | None
    metrics: dict = field(default_factory=dict)
    global_step: int = 0
    data: dict = field(default_factory=dict)
    # True when final_dir holds a PEFT adapter (adapter_config.json) rather than full weights.
    adapter: bool = False
    # Extra facts for run.json (e.g. how DPO formed its reference).
    notes: dict = field(default_factory=dict)


@dataclass
class StageOutput:
    """A finished stage as later stages see it (one entry of run.json's "stages")."""

    name: str
    kind: str
    final_dir: Path | None
    adapter: bool
    metrics: dict = field(default_factory=dict)
    # True for a training stage (one of lmpipeline/methods); merge also leaves a model but trained nothing.
    trained: bool = True


@dataclass
class RunContext:
    """The run a stage executes in: where it writes, the base model, and what ran before it."""

    run_dir: Path
    base_model: str
    tokenizer_path: str | None = None
    torch_dtype: str = "auto"
    completed: list[StageOutput] = field(default_factory=list)

    def latest_model(self) -> StageOutput | None:
        """The most recent stage that produced a model (adapter or full weights: a training stage or a merge;
        eval and package leave no final folder)."""
        for out in reversed(self.completed):
            if out.final_dir is not None:
                return out
        return None
