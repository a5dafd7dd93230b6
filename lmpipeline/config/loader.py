"""Read a YAML config (safe YAML only), apply --set overrides, and validate it all at once.

Two shapes load:
- the pipeline form: model_name_or_path, output_dir, stages, stage_configs;
- the sectioned single-run form of TRL-style config.yaml files: model:, lora:, training:, dataset: -> one SFT stage.

Every error names the dotted key, the file and the line it came from (or `--set` for overrides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpipeline.config.errors import ConfigError, ConfigIssue, did_you_mean
from lmpipeline.config.ranges import unusable_values
from lmpipeline.config.schema import STAGE_ALIASES, STAGE_CONFIG_CLASSES, PipelineConfig

Path_ = tuple  # a key path such as ("stage_configs", "sft", "lora_r")

# The sectioned form's keys, mapped onto the flat names of the SFT stage (None = top level key).
SECTIONED_KEYS: dict[str, dict[str, tuple[str | None, str]]] = {
    "model": {
        "name": (None, "model_name_or_path"),
        "preset": (None, "preset"),
        "size": (None, "model_size"),
        "model_size": (None, "model_size"),
        "name_or_path": (None, "model_name_or_path"),
        "tokenizer": (None, "tokenizer_name_or_path"),
        "max_seq_length": ("sft", "max_seq_length"),
        "load_in_4bit": ("sft", "use_4bit"),
        "load_in_8bit": ("sft", "use_8bit"),
        "torch_dtype": (None, "torch_dtype"),
        "trust_remote_code": ("sft", "trust_remote_code"),
        "attn_implementation": ("sft", "attn_implementation"),
        "chat_template": ("sft", "chat_template"),
    },
    "lora": {
        "r": ("sft", "lora_r"),
        "alpha": ("sft", "lora_alpha"),
        "dropout": ("sft", "lora_dropout"),
        "target_modules": ("sft", "lora_target_modules"),
        "use_dora": ("sft", "use_dora"),
        "use_rslora": ("sft", "use_rslora"),
        "enabled": ("sft", "use_lora"),
    },
    "dataset": {
        "path": ("sft", "dataset_name_or_path"),
        "format": ("sft", "dataset_format"),
        "split": ("sft", "dataset_split"),
        "max_samples": ("sft", "max_samples"),
        "text_field": ("sft", "dataset_text_field"),
        "column_mapping": ("sft", "column_mapping"),
        "eval_path": ("sft", "eval_dataset_name_or_path"),
        "validation_split_ratio": ("sft", "validation_split_ratio"),
    },
}
# In the sectioned form `dataset.format: custom` means a plain text column.
SECTIONED_FORMAT_NAMES = {"custom": "text"}
# `training:` takes any SFT stage key as it is; only output_dir is the run's (top level).
TRAINING_SECTION = "training"
SECTIONS = tuple(SECTIONED_KEYS) + (TRAINING_SECTION,)


def sectioned_destination(section: str, key: str) -> tuple[str | None, str] | None:
    """Where `section.key` of the sectioned form lands in the pipeline form: (None, top-level key) or
    ("sft", stage key); None for a key the section does not have. The file and --set share this map."""
    if section == TRAINING_SECTION:
        return (None, key) if key == "output_dir" else ("sft", key)
    return SECTIONED_KEYS.get(section, {}).get(key)


def _sectioned_path(destination: tuple[str | None, str]) -> Path_:
    target, key = destination
    return (key,) if target is None else ("stage_configs", "sft", key)


class _Located:
    """YAML data plus the line each key path was written on."""

    def __init__(self, data: Any, lines: dict[Path_, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file

    def line(self, path: Path_) -> int | None:
        # The closest enclosing key that has a line: an error inside a value points at its key.
        for cut in range(len(path), 0, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return None


def _key_lines(node: yaml.Node, path: Path_, out: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _key_lines(item, path + (i,), out)


# How many values a config may expand to through YAML aliases (&a / *a). A real config has a few
# hundred; an alias of aliases of aliases ("billion laughs") expands exponentially and would hang
# every later step, so past this budget the file is refused.
ALIAS_BUDGET = 20_000
MERGE_KEY = "<<"


def _structure_issues(node: yaml.Node | None, file: str) -> list[ConfigIssue]:
    """Duplicate keys (YAML silently keeps the last) and alias expansion past ALIAS_BUDGET."""
    issues: list[ConfigIssue] = []
    checked: set[int] = set()  # a mapping reached again through an alias is checked once
    stack: list[tuple[yaml.Node, Path_]] = [(node, ())] if node is not None else []
    expanded = 0
    while stack:
        current, path = stack.pop()
        expanded += 1
        if expanded > ALIAS_BUDGET:
            issues.append(ConfigIssue(".".join(map(str, path[:1])), f"the YAML expands to more than {ALIAS_BUDGET:,} values "
                                      "through aliases (&name / *name); write the values out, or use fewer nested "
                                      "aliases", file, current.start_mark.line + 1))
            break
        if isinstance(current, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in current.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if id(current) not in checked and key is not None and key != MERGE_KEY:
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        issues.append(ConfigIssue(".".join(map(str, path + (key,))),
                                                  f"duplicate key: written at line {first_line[key]} and again at line "
                                                  f"{line}; YAML would keep only the last one silently, so remove one",
                                                  file, line))
                    else:
                        first_line[key] = line
                stack.append((value_node, path + (key,)))
            checked.add(id(current))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, path + (i,)) for i, item in enumerate(current.value))
    return sorted(issues, key=lambda i: i.line or 0)


def read_yaml(path: str | Path) -> _Located:
    """Safe-load a YAML file, remembering key lines. Python tags and syntax errors become ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("", f"config file not found: {file}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue("", f"config is not UTF-8 text ({e.reason})", file)]) from None
    except OSError as e:
        raise ConfigError([ConfigIssue("", f"cannot read config: {e.strerror}", file)]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        structure = _structure_issues(node, file)  # before anything walks or expands the tree
        if structure:
            raise ConfigError(structure)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = f"{e.problem or e}" + (" (only plain YAML is accepted; Python tags are refused)" if "python" in str(e) else "")
        raise ConfigError([ConfigIssue("", f"invalid YAML: {msg}", file, line)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue("", f"invalid YAML: {e}", file)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the config must be a mapping of keys to values", file, 1)])
    lines: dict[Path_, int] = {}
    if node is not None:
        _key_lines(node, (), lines)
    return _Located(data, lines, file)


def parse_override(text: str) -> tuple[Path_, Any]:
    """`stage_configs.sft.learning_rate=1e-4` -> (("stage_configs","sft","learning_rate"), 1e-4)."""
    if "=" not in text:
        raise ConfigError([ConfigIssue("", f"--set `{text}`: expected KEY=VALUE", "--set")])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads `1e-4` as a string; a user writing a number on the command line means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return tuple(key.strip().split(".")), value


def _set_path(data: dict, path: Path_, value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


# Keys the sectioned form also takes at the top level, as the pipeline form does.
TOP_LEVEL_KEYS = ("output_dir", "model_name_or_path", "torch_dtype", "preset", "model_size")


def is_sectioned(data: dict) -> bool:
    return "stages" not in data and "stage_configs" not in data and any(k in data for k in SECTIONS)


def _from_sectioned(loc: _Located) -> tuple[dict, dict[Path_, int], list[ConfigIssue]]:
    """Translate the sectioned form into the pipeline form; remember where each value came from."""
    data, issues = loc.data, []
    out: dict[str, Any] = {"stages": ["sft"], "stage_configs": {"sft": {}}}
    lines: dict[Path_, int] = {}

    def put(destination: tuple[str | None, str], value, src: Path_):
        dest = _sectioned_path(destination)
        _set_path(out, dest, value)
        if loc.line(src):
            lines[dest] = loc.line(src)

    for section, value in data.items():
        if section in SECTIONS:
            if not isinstance(value, dict):
                issues.append(ConfigIssue(section, "must be a mapping", loc.file, loc.line((section,))))
                continue
            for key, v in value.items():
                destination = sectioned_destination(section, key)
                if destination is None:
                    hint = did_you_mean(key, SECTIONED_KEYS[section])
                    issues.append(ConfigIssue(f"{section}.{key}", f"unknown key{hint}", loc.file, loc.line((section, key))))
                    continue
                if section == "dataset" and key == "format":
                    v = SECTIONED_FORMAT_NAMES.get(v, v)
                put(destination, v, (section, key))
        elif section in TOP_LEVEL_KEYS:
            put((None, section), value, (section,))
        else:
            hint = did_you_mean(section, list(SECTIONS) + ["output_dir"])
            issues.append(ConfigIssue(section, f"unknown section{hint}", loc.file, loc.line((section,))))
    # Stage-level keys keep their (prefixed) line numbers for validation messages.
    return out, lines, issues


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> PipelineConfig:
    """Load, translate, override and validate. Raises ConfigError listing every problem."""
    if path is not None:
        loc = read_yaml(path)
    else:
        loc = _Located(data or {}, {}, "<config>")
    issues: list[ConfigIssue] = []
    if is_sectioned(loc.data):
        raw, lines, issues = _from_sectioned(loc)
    else:
        raw, lines = dict(loc.data), dict(loc.lines)

    derived: dict[str, Any] = {}
    if "stages" not in raw and isinstance(raw.get("stage_configs"), dict) and raw["stage_configs"]:
        # A config may list only stage_configs: run those stages in the order written.
        raw["stages"] = list(raw["stage_configs"])
        derived["stages"] = raw["stages"]

    override_paths = set()
    for text in overrides or []:
        key, value = parse_override(text)
        if is_sectioned(loc.data) and key and key[0] in SECTIONS:
            # The sectioned form's own names (`training.learning_rate`, `lora.r`) address the SFT stage.
            destination = sectioned_destination(key[0], key[1]) if len(key) == 2 else None
            if destination is None:
                known = SECTIONED_KEYS.get(key[0], {})
                hint = did_you_mean(key[-1], known) if len(key) == 2 else f"; give one key: {key[0]}.KEY=VALUE"
                issues.append(ConfigIssue(".".join(key), f"unknown key{hint}", "--set"))
                continue
            if key == ("dataset", "format"):
                value = SECTIONED_FORMAT_NAMES.get(value, value)
            key = _sectioned_path(destination)
        _set_path(raw, key, value)
        override_paths.add(key)

    def where(p: Path_) -> tuple[str, int | None]:
        for cut in range(len(p), 0, -1):
            if p[:cut] in override_paths:
                return "--set", None
        return loc.file, lines.get(p) or loc.line(p)

    # Presets (`preset:`, `model_size:`) fill only keys the file and --set left out (lmpipeline/config/presets.py).
    from lmpipeline.config.presets import apply_presets

    filled = apply_presets(raw)
    issues.extend(ConfigIssue(".".join(map(str, p)), msg, *where(p)) for p, msg in filled.issues)
    derived.update(filled.filled)
    if filled.sources:
        derived["preset_sources"] = filled.sources

    try:
        cfg = PipelineConfig(**raw)
    except ValidationError as err:
        for e in err.errors():
            p = tuple(e["loc"])
            f, ln = where(p)
            msg = (
                f"unknown key{did_you_mean(p[-1], PipelineConfig.model_fields)}"
                if e["type"] == "extra_forbidden"
                else e["msg"].removeprefix("Value error, ")
            )
            issues.append(ConfigIssue(".".join(map(str, p)), msg, f, ln))
        raise ConfigError(issues)

    for i, name in enumerate(cfg.stages):
        if name not in STAGE_ALIASES:
            f, ln = where(("stages", i))
            hint = did_you_mean(name, STAGE_ALIASES)
            issues.append(ConfigIssue(f"stages[{i}]", f"unknown stage `{name}`{hint}; known: {', '.join(sorted(STAGE_ALIASES))}", f, ln))
    if len(set(cfg.stages)) != len(cfg.stages):
        issues.append(ConfigIssue("stages", "a stage is listed twice", *where(("stages",))))
    for name, params in cfg.stage_configs.items():
        if name not in cfg.stages:
            f, ln = where(("stage_configs", name))
            hint = did_you_mean(name, cfg.stages)
            issues.append(ConfigIssue(f"stage_configs.{name}", f"configures a stage that is not in `stages`{hint}", f, ln))
            continue
        cls = STAGE_CONFIG_CLASSES[STAGE_ALIASES[name]] if name in STAGE_ALIASES else None
        if cls is None:
            continue
        if not isinstance(params, dict):
            issues.append(ConfigIssue(f"stage_configs.{name}", "must be a mapping of parameters", *where(("stage_configs", name))))
            continue
        try:
            checked = cls(stage_name=name, **params)
            for key, msg in unusable_values(checked):
                p = ("stage_configs", name, key)
                issues.append(ConfigIssue(".".join(p), msg, *where(p)))
        except ValidationError as err:
            for e in err.errors():
                p = ("stage_configs", name) + tuple(e["loc"])
                f, ln = where(p)
                msg = (
                    f"unknown key{did_you_mean(p[-1], cls.model_fields)}"
                    if e["type"] == "extra_forbidden"
                    else e["msg"].removeprefix("Value error, ")
                )
                issues.append(ConfigIssue(".".join(map(str, p)), msg, f, ln))
    if not cfg.stages:
        issues.append(ConfigIssue("stages", "no stages to run; e.g. `stages: [sft]`", loc.file, loc.line(("stages",))))
    if issues:
        raise ConfigError(issues)
    cfg._derived = derived
    cfg._source_file = loc.file if path is not None else None
    cfg._key_lines = {".".join(map(str, k)): v for k, v in lines.items()}
    return cfg


def key_location(cfg: PipelineConfig, dotted: str) -> str:
    """'file:line' for a dotted key of a loaded config, for errors found after validation."""
    file = getattr(cfg, "_source_file", None) or "<config>"
    line = getattr(cfg, "_key_lines", {}).get(dotted)
    return f"{file}:{line}" if line else file


def select_stages(cfg: PipelineConfig, wanted: list[str]) -> PipelineConfig:
    """Keep only the `wanted` stages of a loaded config, in the config's own order (`run --stages`).

    The subset is stored as a derived value, so run.json says which stages ran and why. Raises
    ConfigError naming every name that is not a stage of the config, with the stages it has."""
    unknown = [w for w in wanted if w not in cfg.stages]
    if unknown:
        raise ConfigError([ConfigIssue("--stages", f"`{w}` is not a stage of this config{did_you_mean(w, cfg.stages)}; "
                                                   f"its stages: {', '.join(cfg.stages)}", "--stages") for w in unknown])
    if not wanted:
        raise ConfigError([ConfigIssue("--stages", f"no stage named; its stages: {', '.join(cfg.stages)}", "--stages")])
    cfg.stages = [s for s in cfg.stages if s in wanted]
    cfg._derived["stages"] = list(cfg.stages)
    return cfg
