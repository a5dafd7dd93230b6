"""Model presets and architectures: what lmpipeline knows about a model before loading it.

Two kinds of preset, both top-level config keys, both plain config fragments (lmpipeline/config/presets/):

- `model_size: 7b | 13b | 70b` applies per-size defaults (`model_sizes.yaml`): LoRA r 16/32/64,
  alpha 32/64/128, dropout 0.05, micro-batch 4/2/1 x GA 4/8/16, length 2048 to every training stage, and
  learning rate 2e-5 and 3 epochs to SFT stages (DPO keeps its own rate and epochs).
- `preset: <family>` (e.g. `llama-3.2-3b`, `qwen2.5-7b`, `gemma-2-9b`; `<family>.yaml`) fills the model id,
  precision, LoRA targets and attention backend of that family, and names the size class it trains with
  (`model_size`), whose defaults it then brings in as well.

Precedence: your keys (in the file or from --set) > the family preset > the size class > the schema's
defaults. A preset never changes a value you wrote; every value it fills in is recorded in the config's
derived values (printed by `lmpipeline validate`, stored in run.json under "derived", with the preset it
came from under "derived.preset_sources").

Architectures: `resolve_architecture(name_or_path)` returns the shapes the estimator needs, from a local
folder's config.json (an adapter folder: its base model's), else from the architecture configs shipped in
lmpipeline/config/model_configs/ matched by name (`ARCH_PATTERNS`), else from the Hugging Face cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lmpipeline.config.errors import did_you_mean
from lmpipeline.config.schema import STAGE_ALIASES, TRAINING_KINDS

HERE = Path(__file__).resolve().parent
PRESET_DIR = HERE / "presets"
MODEL_CONFIG_DIR = HERE / "model_configs"
SIZES_FILE = PRESET_DIR / "model_sizes.yaml"
MODEL_SIZES = ("7b", "13b", "70b")

# Hub-id (or folder name) patterns -> shipped architecture folder. Matched against the lowercased last
# path component with "_" read as "-"; first match wins, so the specific patterns come first. Models
# of the same shapes share a folder (Llama-3-8B = Llama-3.1-8B shapes; Mistral-7B v0.1/v0.2 differ from
# v0.3 only in a 768-token larger vocabulary and a sliding window, which the estimate reports as such).
ARCH_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llama-?3\.2-1b", "llama-3.2-1b"),
    (r"llama-?3\.2-3b", "llama-3.2-3b"),
    (r"llama-?3(\.1)?-8b-instruct", "llama-3.1-8b-instruct"),
    (r"llama-?3(\.1)?-8b", "llama-3.1-8b"),
    (r"llama-?3(\.[13])?-70b", "llama-3.1-70b"),
    (r"llama-2-7b", "llama-2-7b"),
    (r"llama-2-13b", "llama-2-13b"),
    (r"llama-2-70b", "llama-2-70b"),
    (r"qwen2\.5-(coder-|math-)?0\.5b", "qwen2.5-0.5b-instruct"),
    (r"qwen2\.5-(coder-|math-)?1\.5b", "qwen2.5-1.5b"),
    (r"qwen2\.5-(coder-|math-)?3b", "qwen2.5-3b"),
    (r"qwen2\.5-(coder-|math-)?7b", "qwen2.5-7b"),
    (r"qwen2\.5-(coder-)?14b", "qwen2.5-14b"),
    (r"qwen2\.5-(coder-)?32b", "qwen2.5-32b"),
    (r"qwen2\.5-(math-)?72b", "qwen2.5-72b"),
    (r"qwen2-7b", "qwen2-7b-instruct"),
    (r"qwen3-0\.6b", "qwen3-0.6b"),
    (r"mistral-7b", "mistral-7b-v0.3"),
    (r"gemma-2-2b", "gemma-2-2b"),
    (r"gemma-2-9b", "gemma-2-9b"),
    (r"phi-3(\.5)?-mini", "phi-3-mini-4k-instruct"),
)


# ----------------------------------------------------------------------------------------------
# Presets


@lru_cache(maxsize=None)
def _load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset must be a mapping")
    return data


def model_sizes() -> dict[str, dict]:
    return _load_yaml(SIZES_FILE)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.name != SIZES_FILE.name)


def load_preset(name: str) -> dict:
    """The fragment of family preset `name` (KeyError when there is none)."""
    path = PRESET_DIR / f"{name}.yaml"
    if name not in available_presets():
        raise KeyError(name)
    return _load_yaml(path)


@dataclass
class PresetResult:
    """What apply_presets filled in: dotted key -> value, dotted key -> source, and problems found."""

    filled: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    issues: list[tuple[tuple, str]] = field(default_factory=list)  # (key path, message)


def apply_presets(raw: dict) -> PresetResult:
    """Fill the keys a preset provides into `raw` (the pipeline-form dict before validation), in place,
    only where the user did not write them. Returns what was filled, from which preset, and problems."""

    result = PresetResult()
    preset_name = raw.get("preset")
    size = raw.get("model_size")
    if preset_name is None and size is None:
        return result

    family: dict = {}
    if preset_name is not None:
        try:
            family = load_preset(str(preset_name))
        except KeyError:
            names = available_presets()
            result.issues.append((("preset",), f"unknown preset `{preset_name}`{did_you_mean(str(preset_name), names)}; "
                                               f"known: {', '.join(names)}"))
            return result
    size_source = "model_size"
    if size is None and family.get("model_size") is not None:
        size = family["model_size"]
        size_source = f"preset {preset_name} (model_size {size})"
        raw["model_size"] = size
        result.filled["model_size"] = size
        result.sources["model_size"] = f"preset {preset_name}"
    sizes = model_sizes()
    size_frag: dict = {}
    if size is not None:
        if str(size).lower() not in sizes:
            return result  # the schema reports the unknown size, with its choices
        size_frag = sizes[str(size).lower()]
        if size_source == "model_size":
            size_source = f"model_size {str(size).lower()}"

    # Top-level keys (the model id) come from the family preset only.
    for key, value in (family.get("config") or {}).items():
        if key not in raw:
            raw[key] = value
            result.filled[key] = value
            result.sources[key] = f"preset {preset_name}"

    stages = raw.get("stages") or list((raw.get("stage_configs") or {}).keys())
    if not isinstance(stages, list):
        return result
    stage_configs = raw.setdefault("stage_configs", {})
    if not isinstance(stage_configs, dict):
        return result
    for name in stages:
        kind = STAGE_ALIASES.get(str(name))
        if kind not in TRAINING_KINDS:
            continue
        user = stage_configs.setdefault(name, {})
        if not isinstance(user, dict):
            continue  # validation reports it
        layered: dict[str, tuple[Any, str]] = {}
        for frag, source in ((size_frag, size_source), (family, f"preset {preset_name}")):
            for section in ("train", kind):
                for key, value in (frag.get(section) or {}).items():
                    layered[key] = (value, source)
        for key, (value, source) in layered.items():
            if key in user:
                continue  # the user's value wins, always
            user[key] = value
            dotted = f"stage_configs.{name}.{key}"
            result.filled[dotted] = value
            result.sources[dotted] = source
    return result


# ----------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer that decide its memory and FLOPs."""

    name: str
    source: str  # where the shapes came from, for the report
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3: one qkv_proj, one gate_up_proj
    norms_per_layer: int = 2  # Gemma-2: 4 (pre and post norms)
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head
    norm_fp32_math: bool = False  # Gemma: RMSNorm output * (1 + weight) computed in fp32
    attn_softcap: float | None = None  # Gemma-2: attention logits soft-capped (no SDPA kernel)
    final_softcap: float | None = None  # Gemma-2: final logits soft-capped (not lm_head(hidden))
    sliding_window: int | None = None  # attention window when the model uses one (Mistral v0.1, Gemma-2)
    notes: tuple[str, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_modules(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of the linear layers of one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        if self.fused_qkv:
            return [("qkv_proj", h, q + 2 * kv, self.qkv_bias), ("o_proj", q, h, self.o_bias),
                    ("gate_up_proj", h, 2 * i, self.mlp_bias), ("down_proj", i, h, self.mlp_bias)]
        return [("q_proj", h, q, self.qkv_bias), ("k_proj", h, kv, self.qkv_bias), ("v_proj", h, kv, self.qkv_bias),
                ("o_proj", q, h, self.o_bias), ("gate_proj", h, i, self.mlp_bias), ("up_proj", h, i, self.mlp_bias),
                ("down_proj", i, h, self.mlp_bias)]

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for _, a, b, _ in self.linear_modules())

    @property
    def bias_params_per_layer(self) -> int:
        return sum(b for _, _, b, has in self.linear_modules() if has)

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        per_layer = self.linear_params_per_layer + self.bias_params_per_layer + self.norm_params_per_layer
        return self.num_layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies through (the LM head counts even when tied; the embedding
        lookup does not): the N of the 2N FLOPs-per-token forward."""
        return self.num_layers * self.linear_params_per_layer + self.vocab_size * self.hidden_size

    @classmethod
    def from_config(cls, cfg: dict, *, name: str, source: str) -> "Architecture":
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        model_type = str(text.get("model_type") or cfg.get("model_type") or "unknown")
        h = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        head_dim = text.get("head_dim") or h // heads
        tied_default = model_type in ("gemma", "gemma2", "gemma3_text", "qwen3") and "tie_word_embeddings" not in text
        notes = []
        if model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gemma"):
            notes.append(f"model_type `{model_type}` is estimated as a Llama-style block (not calibrated)")
        return cls(
            name=name,
            source=source,
            model_type=model_type,
            vocab_size=int(text["vocab_size"]),
            hidden_size=h,
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            tied_embeddings=bool(text.get("tie_word_embeddings", tied_default)),
            qkv_bias=model_type == "qwen2" or bool(text.get("attention_bias", False)),
            o_bias=bool(text.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(text.get("mlp_bias", False)),
            fused_qkv=model_type == "phi3",
            norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_fp32_math=model_type in ("gemma", "gemma2", "gemma3_text"),
            attn_softcap=text.get("attn_logit_softcapping"),
            final_softcap=text.get("final_logit_softcapping"),
            sliding_window=(text.get("sliding_window") if text.get("use_sliding_window", True) else None) or None,
            notes=tuple(notes),
        )


def match_shipped(name: str) -> str | None:
    """The shipped architecture folder a model id or folder name refers to, or None."""
    base = str(name).rstrip("/").split("/")[-1].lower().replace("_", "-")
    for pattern, folder in ARCH_PATTERNS:
        if re.search(pattern, base):
            return folder
    return None


def shipped_architectures() -> list[str]:
    return sorted(p.name for p in MODEL_CONFIG_DIR.iterdir() if (p / "config.json").is_file())


def load_shipped(folder: str, *, matched_from: str | None = None) -> Architecture:
    path = MODEL_CONFIG_DIR / folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    source = f"shipped architecture config `{folder}`"
    if matched_from:
        source += f" (matched by name from `{matched_from}`)"
    return Architecture.from_config(cfg, name=folder, source=source)


def _cached_hub_config(name: str) -> dict | None:
    """config.json of a Hub id already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - no hub library, malformed id: just not cached
        return None
    if isinstance(path, str) and Path(path).is_file():
        return json.loads(Path(path).read_text(encoding="utf-8"))
    return None


def resolve_architecture(name_or_path: str | None, *, preset: str | None = None) -> Architecture | None:
    """Shapes of `name_or_path`: a local folder's config.json (an adapter folder: its base's), a shipped
    config matched by name, the preset's architecture, or the local HF cache. None when unknown."""
    if not name_or_path and not preset:
        return None
    if name_or_path:
        p = Path(str(name_or_path)).expanduser()
        if p.is_dir():
            if (p / "config.json").is_file():
                cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
                if "hidden_size" in cfg or "text_config" in cfg:
                    return Architecture.from_config(cfg, name=p.name, source=f"{p / 'config.json'}")
            adapter = p / "adapter_config.json"
            if adapter.is_file():
                base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
                if base and str(base) != str(name_or_path):
                    return resolve_architecture(base, preset=preset)
            chain = p / "lmpipeline_chain.json"
            if chain.is_file():
                base = json.loads(chain.read_text(encoding="utf-8")).get("base_model")
                if base:
                    return resolve_architecture(base, preset=preset)
        folder = match_shipped(str(name_or_path))
        if folder is not None:
            return load_shipped(folder, matched_from=str(name_or_path))
        cached = _cached_hub_config(str(name_or_path))
        if cached is not None:
            return Architecture.from_config(cached, name=str(name_or_path), source="the local Hugging Face cache")
    if preset:
        try:
            arch = load_preset(preset).get("architecture")
        except KeyError:
            arch = None
        if arch:
            return load_shipped(arch, matched_from=f"preset {preset}")
    return None
