"""Write docs/config.md from the config schema and the method table (each method's config class), so the reference can never drift from the code.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 if it is stale (used by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipeline.config import lifecycle, schema  # noqa: E402
from lmpipeline.methods import METHODS  # noqa: E402


def _names(method) -> str:
    return "/".join(f"`{n}`" for n in method.names)


SECTIONS = [
    ("Top level (pipeline form)", schema.PipelineConfig, None),
    (f"Training stages: shared keys ({', '.join(_names(m) for m in METHODS)})", schema.TrainStageConfig, None),
    *[(f"{_names(m)} only (and changed defaults): {m.title or m.summary}", m.config_class, schema.TrainStageConfig)
      for m in METHODS],
    ("A dataset in a mixture (`dataset_name_or_path: [...]`)", schema.DatasetSpec, None),
]


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "(required)" if field.default_factory is None else ""
    if field.default is None:
        return ""
    return f"`{field.default}`"


def table(cls: type[BaseModel], parent: type[BaseModel] | None) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, f in cls.model_fields.items():
        if name in ("stage_name", "output_dir") and cls is not schema.PipelineConfig:
            continue
        if parent is not None and name in parent.model_fields and parent.model_fields[name].default == f.default:
            continue
        lines.append(f"| `{name}` | {_default(f)} | {(f.description or '').replace('|', '/')} |")
    return "\n".join(lines)


def render() -> str:
    parts = [
        "# Config reference",
        "",
        "Generated from `lmpipeline/config/schema.py` and the method table (`lmpipeline/methods`) by `scripts/config_reference.py`; do not edit by hand.",
        "Unknown keys are errors. Seed 000's sectioned form (`model:`, `lora:`, `training:`, `dataset:`) is",
        "translated to these keys (see `SECTIONED_KEYS` in `lmpipeline/config/loader.py`).",
        "",
    ]
    for title, cls, parent in SECTIONS[:-1]:
        parts += [f"## {title}", "", table(cls, parent), ""]
    parts += [
        "## Evaluation, merging, packaging (`eval`, `merge`, `package`)",
        "",
        "Shared by the three; in a pipeline, `allow_pickle_weights` defaults to what the training stages set",
        "(they load the same base). The commands take it as `--allow-pickle-weights`.",
        "",
        table(lifecycle._LifecycleStage, None),
        "",
    ]
    for name, cls in lifecycle.LIFECYCLE_CONFIG_CLASSES.items():
        parts += [f"### `{name}`", "", table(cls, lifecycle._LifecycleStage), ""]
    title, cls, parent = SECTIONS[-1]
    parts += [f"## {title}", "", table(cls, parent), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    target = ROOT / "docs" / "config.md"
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if target.exists() and target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target}")
