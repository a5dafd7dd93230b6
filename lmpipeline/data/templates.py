"""Chat templates: the built-in ones, choosing which template a run uses, and each one's end of turn.

Built-ins (Jinja files in `lmpipeline/data/templates/`, written for lmpipeline and checked in tests
against the real templates they reproduce):

    chatml   <|im_start|>{role}\\n{content}<|im_end|>\\n; bos_token first when the tokenizer has one
    qwen2.5  Qwen2.5-Instruct's own format: ChatML, default system prompt, tools and tool calls
    llama-3  Llama 3 instruct: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    llama-2  Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>>\\n\\n{user} [/INST] {assistant} </s>
    mistral  Mistral instruct v0.1 style: <s>{system}\\n\\n[INST] {user} [/INST] {assistant}</s>
    phi-3    Phi-3: <|{role}|>\\n{content}<|end|>\\n, eos after the last message (as the model's own)
    alpaca   for base models: {system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}\\n\\n

Rendered text is later tokenised with add_special_tokens=False (see masking.py), so a template that
needs a BOS token writes `bos_token` itself; none of these relies on the tokenizer adding one.

`resolve_chat_template` picks the template text for a run, in this order:
    1. chat_template_path: a .jinja file, a tokenizer_config.json / chat_template.json holding one,
       or a folder containing one of those;
    2. chat_template: a built-in name, or literal Jinja text;
    3. the tokenizer's own template;
and raises DataError when none applies (a base tokenizer with no template), naming the built-ins.

`end_of_turn_token` says which string closes an assistant turn for a template (<|im_end|>, <|eot_id|>,
<|end|>, or the tokenizer's eos for llama-2/mistral/alpaca). Masking trains the assistant's content
up to and including it; it is None when a custom template gives no recognisable end of turn.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmpipeline.data.types import DataError

_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

BUILTIN_NAMES: tuple[str, ...] = ("chatml", "qwen2.5", "llama-3", "llama-2", "mistral", "phi-3", "alpaca")

# Spellings people commonly type for the same formats; each maps to exactly one built-in.
_ALIASES = {
    "llama3": "llama-3",
    "llama-3-instruct": "llama-3",
    "llama2": "llama-2",
    "llama-2-chat": "llama-2",
    "mistral-instruct": "mistral",
    "qwen2_5": "qwen2.5",
    "qwen2.5-instruct": "qwen2.5",
    "phi3": "phi-3",
}

# What closes an assistant turn. "eos" means the tokenizer's eos_token.
_BUILTIN_EOT = {
    "chatml": "<|im_end|>",
    "qwen2.5": "<|im_end|>",
    "llama-3": "<|eot_id|>",
    "llama-2": "eos",
    "mistral": "eos",
    "phi-3": "<|end|>",
    "alpaca": "eos",
}

# Turn terminators of widely used template families, tried in order on custom templates. Order
# matters: a template containing several (e.g. <|eot_id|> and <|eom_id|>) closes a plain turn with the
# first listed here.
_KNOWN_EOT_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|END_OF_TURN_TOKEN|>",
    "<|eot|>",
    "<|end_of_turn|>",
    "<|return|>",
)


def canonical_name(name: str) -> str | None:
    """The built-in name for `name` (case-insensitive, common aliases accepted), or None."""
    key = name.strip().lower()
    if key in BUILTIN_NAMES:
        return key
    return _ALIASES.get(key)


@lru_cache(maxsize=None)
def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template. Raises DataError for an unknown name."""
    canonical = canonical_name(name)
    if canonical is None:
        raise DataError(
            f"unknown chat template name {name!r}; built-in templates are: {', '.join(BUILTIN_NAMES)} "
            "(or give literal Jinja text, or chat_template_path)",
            key="chat_template",
        )
    return (_TEMPLATE_DIR / f"{canonical}.jinja").read_text(encoding="utf-8")


def builtin_name_of(template: str) -> str | None:
    """Which built-in `template` is (by name or by exact text), or None for a custom template."""
    if not _looks_like_jinja(template):
        return canonical_name(template)
    for name in BUILTIN_NAMES:
        if template == builtin_template(name):
            return name
    return None


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def load_template_file(path: str | Path) -> str:
    """Read a chat template from a .jinja file, a JSON file holding one, or a folder containing one.

    JSON files may be a tokenizer_config.json (`chat_template` key) or a chat_template.json; when the
    template is a list of named templates (the HF multi-template form), the one named "default" is used.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"chat template file not found: {p}", key="chat_template_path")
    if p.is_dir():
        for candidate in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (p / candidate).is_file():
                return load_template_file(p / candidate)
        raise DataError(
            f"no chat template in folder {p}: expected chat_template.jinja, chat_template.json or "
            "tokenizer_config.json",
            key="chat_template_path",
        )
    text = p.read_text(encoding="utf-8")
    if p.suffix != ".json":
        if not text.strip():
            raise DataError(f"chat template file is empty: {p}", key="chat_template_path")
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})", key="chat_template_path") from e
    template = _template_from_config_value(data.get("chat_template") if isinstance(data, dict) else None)
    if template is None:
        raise DataError(f"{p} has no 'chat_template' entry", key="chat_template_path")
    return template


def _template_from_config_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # transformers' in-memory form of named templates
        return value.get("default")
    if isinstance(value, list):  # tokenizer_config.json form: [{"name": ..., "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default")
    return None


def resolve_chat_template(
    tokenizer: Any, *, chat_template_path: str | Path | None = None, chat_template: str | None = None
) -> str:
    """The Jinja text a run renders conversations with (order of precedence in the module docstring)."""
    if chat_template_path:
        return _parsed(load_template_file(chat_template_path), str(chat_template_path), "chat_template_path")
    if chat_template:
        if _looks_like_jinja(chat_template):
            return _parsed(chat_template, "chat_template", "chat_template")
        return builtin_template(chat_template)
    own = _template_from_config_value(getattr(tokenizer, "chat_template", None))
    if own:
        return own
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise DataError(
        f"tokenizer {name!r} has no chat template (a base model?). Set data.chat_template to one of the "
        f"built-ins ({', '.join(BUILTIN_NAMES)}), to literal Jinja, or set chat_template_path",
        key="chat_template",
    )


def _parsed(text: str, where: str, key: str) -> str:
    """`text` once Jinja has parsed it: a syntax error is the template's, named with its line, not blamed
    on the first data row that happens to render it."""
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}:{e.lineno}: the chat template is not valid Jinja: {e.message}", key=key) from None
    return text


def end_of_turn_token(template: str, tokenizer: Any) -> str | None:
    """The text that closes an assistant turn under `template` (a built-in name or Jinja text).

    Built-ins have a fixed answer. For custom text the first known turn terminator that the template
    writes is used; failing that, the tokenizer's eos when the template writes `eos_token`; else None.
    """
    name = builtin_name_of(template)
    if name is not None:
        eot = _BUILTIN_EOT[name]
        return getattr(tokenizer, "eos_token", None) if eot == "eos" else eot
    for marker in _KNOWN_EOT_MARKERS:
        if marker in template:
            return marker
    if re.search(r"\beos_token\b", template):
        return getattr(tokenizer, "eos_token", None)
    return None


def render(
    tokenizer: Any,
    chat_template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """Render messages to text with transformers' own Jinja environment (same filters and globals the
    model's users get: raise_exception, tojson, bos_token, eos_token, ...). Template errors become
    DataError, because they are almost always a row the template cannot express."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except DataError:
        raise
    except Exception as e:  # jinja2 TemplateError, TypeError on None + str, IndexError on [] ...
        raise DataError(f"chat template failed to render this conversation: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):  # batched input or a future API change: fail loudly, not subtly
        raise DataError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
