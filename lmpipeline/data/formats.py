"""Detect a dataset's format and convert its raw rows into the canonical example types.

Format names (`FORMATS`; aliases in `ALIASES`, matched case-insensitively, '-' == '_'):

  SFT (-> ChatExample unless noted)
    alpaca                        instruction, output; optional input, system, history
                                  user = instruction, or instruction + "\\n\\n" + input when input is
                                  non-empty (only input when instruction is empty); history is a
                                  list of [user, assistant] pairs placed before it.
    instruction_context_response  instruction, context, response (as alpaca, context = input)
    instruction_response          instruction, response
    prompt_completion             prompt, completion: strings -> CompletionExample; message lists
                                  (or a mix) -> ChatExample(prompt + completion)
    messages                      messages: [{role, content}]  (aliases chatml, openai)
    sharegpt                      conversations: [{from, value}] or [{role, content}]
                                  (alias conversations)
    text                          the `text_field` column -> TextExample (aliases custom, pretrain)
    column_mapping                `column_mapping={canonical: your_column}` renames, then the row is
                                  detected among the formats above (and below)

  Preference (-> PreferenceExample)
    preference                    prompt?, chosen, rejected as strings or message lists; without
                                  prompt, chosen/rejected are full conversations and the prompt is
                                  their shared prefix (TRL implicit prompt). A string prompt in
                                  the "Human: ... Assistant:" style is parsed into turns.
    sharegpt_preference           conversations (prompt turns) + chosen + rejected (one message each)
    preference_messages           chosen_messages, rejected_messages (prompt = shared prefix)
    hh_rlhf                       chosen, rejected: raw Anthropic "\\n\\nHuman: ...\\n\\nAssistant: ..."
    ultrafeedback                 raw openbmb: instruction + completions[{response, ratings}]
                                  binarised: chosen = best score, rejected = a seeded random
                                  lower-scored one (`ultrafeedback_rejected="random"`) or the
                                  worst ("worst"); no lower-scored completion -> skipped (tie).
                                  Score: `ultrafeedback_score="auto"` takes fine-grained_score,
                                  else the mean of annotations[*].Rating, else overall_score.
    ultrafeedback_binarized       HuggingFaceH4: prompt, chosen/rejected message lists,
                                  score_chosen/score_rejected
  Unpaired preference (-> KTOExample)
    kto                           prompt, completion, label; or messages/conversations + label
                                  (prompt = all turns but the last, completion = the last)

Messages. Roles map to system/user/assistant/tool: human->user; gpt/model/bot->assistant;
function_call->assistant; observation/function/ipython->tool. Content is a string or a list of
typed parts ({"type": "text", "text"|"value": ...}, LLaMA-Factory v1 uses "value"):
  - text parts are concatenated without a separator (as list-content chat templates do);
  - "reasoning"/"thinking" parts never enter the visible content by default: `reasoning="field"`
    stores them as message["reasoning_content"] (the key Qwen3/DeepSeek-R1 templates read),
    "drop" discards them, "inline" prepends "<think>\\n...\\n</think>\\n\\n" to the content;
  - "tool_call" parts, like ShareGPT function_call turns, become OpenAI-style
    message["tool_calls"] = [{"type": "function", "function": {"name", "arguments"}}] when the
    JSON has a name; when the turn has no visible text its content is the calls' JSON text
    (one call a line), so templates without tool support still see the call;
  - image/audio/video parts raise DataError (this pipeline is text-only).
Per-turn "loss_weight" (or "weight": 0 = not trained, 1 = trained, any other value refused), "name" and
"tool_call_id" are kept on the message.
`tools` (a JSON string or a list) is parsed into a list of dicts and passed through unchanged.

Conversation rules (DataError when broken), chosen so that every chat template can render the
result: a system turn only first; the first other turn is a user turn; no two user turns in a
row (no template renders that meaningfully; it usually means a broken conversion); a tool turn
follows an assistant or tool turn; user and assistant turns are non-empty (an assistant turn
may be empty only when it carries tool_calls); at least one assistant turn. Two assistant turns
in a row are allowed: tool-use data produces them and ChatML-style templates render them;
strictly alternating templates (Llama-2, Mistral, Gemma) are checked by the template layer.

Raised: `DataError` (reason, Source, key = the offending column) for rows that cannot be used;
`RowSkipped` (a DataError subclass with a `category`) for rows that are well-formed but carry no
training signal (UltraFeedback ties, identical chosen/rejected): callers count these and never
treat them as invalid.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmpipeline.data.types import (
    ChatExample,
    CompletionExample,
    DataError,
    Example,
    KTOExample,
    Message,
    PreferenceExample,
    Source,
    TextExample,
)


class RowSkipped(DataError):
    """A valid row that is deliberately not used; `category` is what reports count it under."""

    def __init__(self, reason: str, source: Source | None = None, category: str = "skipped"):
        super().__init__(reason, source)
        self.category = category


# name -> (required columns, optional columns, family). The family tells a stage what it can train on:
# "supervised" (SFT rows), "preference" (chosen/rejected pairs), "unpaired" (rows labelled good or bad, KTO).
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "alpaca": (("instruction", "output"), ("input", "system", "history"), "supervised"),
    "instruction_context_response": (("instruction", "context", "response"), ("system",), "supervised"),
    "instruction_response": (("instruction", "response"), ("system",), "supervised"),
    "prompt_completion": (("prompt", "completion"), ("system", "tools"), "supervised"),
    "messages": (("messages",), ("tools", "system"), "supervised"),
    "sharegpt": (("conversations",), ("tools", "system"), "supervised"),
    "text": (("<text_field>",), (), "supervised"),
    "column_mapping": (("<column_mapping option>",), (), "any"),
    "preference": (("chosen", "rejected"), ("prompt", "system", "tools", "score_chosen", "score_rejected"), "preference"),
    "sharegpt_preference": (("conversations", "chosen", "rejected"), ("tools", "system"), "preference"),
    "preference_messages": (("chosen_messages", "rejected_messages"), ("tools", "system"), "preference"),
    "hh_rlhf": (("chosen", "rejected"), (), "preference"),
    "ultrafeedback": (("instruction", "completions"), (), "preference"),
    "ultrafeedback_binarized": (("prompt", "chosen", "rejected", "score_chosen", "score_rejected"), (), "preference"),
    "kto": (("label",), ("prompt", "completion", "messages", "conversations", "system", "tools"), "unpaired"),
}

ALIASES = {
    "chatml": "messages",
    "openai": "messages",
    "conversational": "messages",
    "conversations": "sharegpt",
    "custom": "text",
    "plain_text": "text",
    "pretrain": "text",
    "completion": "prompt_completion",
    "dolly": "instruction_context_response",
    "columns": "column_mapping",
    "dpo": "preference",
    "pairwise": "preference",
    "hh": "hh_rlhf",
    "unpaired_preference": "kto",
}

KNOWN_FIELDS = sorted(
    {f for req, opt, _ in FORMATS.values() for f in req + opt if not f.startswith("<")}
    | {"text", "label", "context", "response"}
)

ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}
_CALL_ROLES = {"function_call"}
_MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file"}
_REASONING_PARTS = {"reasoning", "thinking"}
_CALL_PARTS = {"tool_call", "function_call"}

DETECT_SAMPLE = 20

# What each format needs, for people reading a detection error.
NEEDS = {
    "alpaca": "instruction + output",
    "instruction_context_response": "instruction + context + response",
    "instruction_response": "instruction + response",
    "prompt_completion": "prompt + completion",
    "messages": "messages",
    "sharegpt": "conversations",
    "text": "<text_field>",
    "preference": "chosen + rejected (+ prompt)",
    "sharegpt_preference": "conversations + chosen + rejected",
    "preference_messages": "chosen_messages + rejected_messages",
    "hh_rlhf": "chosen + rejected holding 'Human:'/'Assistant:' text",
    "ultrafeedback": "instruction + completions",
    "ultrafeedback_binarized": "prompt + chosen + rejected + score_chosen",
    "kto": "label + (messages or prompt + completion)",
}


@dataclass(frozen=True)
class _Options:
    text_field: str = "text"
    reasoning: str = "field"
    ultrafeedback_rejected: str = "random"
    ultrafeedback_score: str = "auto"
    seed: int = 42


def canonical_format(name: str) -> str:
    """The canonical format name for `name` or an alias; DataError with suggestions otherwise."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return key
    choices = sorted(set(FORMATS) | set(ALIASES))
    close = difflib.get_close_matches(key, choices, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise DataError(f"unknown data format '{name}'.{hint} Known formats: {', '.join(FORMATS)}")


def format_kind(fmt: str) -> str:
    """The family of `fmt`: "supervised", "preference", "unpaired", or "any" for column_mapping."""
    return FORMATS[canonical_format(fmt)][2]


# ---------------------------------------------------------------------------------------------
# Detection


def _detect_row(row: dict, text_field: str = "text") -> str | None:
    """The format a single row looks like, by its keys (and a few value types), or None."""
    keys = {k for k, v in row.items() if v is not None}  # Arrow fills absent columns with None
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "preference_messages"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            return "sharegpt_preference"
        chosen = row.get("chosen")
        if "prompt" not in keys and isinstance(chosen, str) and "Human:" in chosen:
            return "hh_rlhf"
        if "prompt" in keys and "score_chosen" in keys and isinstance(chosen, list):
            return "ultrafeedback_binarized"
        return "preference"
    if "label" in keys and ({"messages", "conversations"} & keys or {"prompt", "completion"} <= keys):
        return "kto"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "context", "response"} <= keys:
        return "instruction_context_response"
    if {"instruction", "response"} <= keys:
        return "instruction_response"
    if isinstance(row.get(text_field), str):
        return "text"
    return None


def detect_format(
    rows: Sequence[dict],
    text_field: str = "text",
    sample: int = DETECT_SAMPLE,
    *,
    column_mapping: dict[str, str] | None = None,
) -> str:
    """Detect the format of `rows` from the first `sample` of them (after `column_mapping`).

    Rows that match no format are ignored as long as the others agree (one misspelled row is
    reported later, by conversion, with its line). Raises DataError when the rows match two
    formats or none, listing the keys seen, what each format needs, and near-miss key names.
    """
    seen = [r for r in rows[:sample] if isinstance(r, dict)]
    if column_mapping:
        # A row lacking a mapped column is reported by conversion, with its line; skip it here.
        seen = [apply_column_mapping(r, column_mapping) for r in seen if set(column_mapping.values()) <= set(r)]
    votes = Counter(f for f in (_detect_row(r, text_field) for r in seen) if f is not None)
    if len(votes) == 1:
        return next(iter(votes))
    keys = sorted({k for r in seen for k in r})
    needs = "".join(f"\n  {name}: {need}" for name, need in NEEDS.items()).replace("<text_field>", text_field)
    if len(votes) > 1:
        found = ", ".join(f"{f} ({n} rows)" for f, n in votes.most_common())
        raise DataError(
            f"the first {len(seen)} rows mix formats: {found}. Keys seen: {', '.join(keys)}. "
            "Set the format explicitly or split the data into one file per format."
        )
    typos = _typo_hints(keys)
    raise DataError(
        f"could not detect the data format: keys seen in the first {len(seen)} rows: "
        f"{', '.join(keys) or '(none)'}.{typos}\nFormats and the keys they need:{needs}\n"
        "Set the format explicitly, or map your columns with "
        "column_mapping: {canonical_name: your_column}."
    )


def _typo_hints(keys: Sequence[str], wanted: Sequence[str] = KNOWN_FIELDS) -> str:
    hints = []
    for key in keys:
        if key in wanted:
            continue
        close = difflib.get_close_matches(key, wanted, n=1, cutoff=0.8)
        if close:
            hints.append(f"'{key}' looks like '{close[0]}'")
    return f" Did you mean: {', '.join(hints)}?" if hints else ""


# ---------------------------------------------------------------------------------------------
# Conversion entry point


def convert_row(
    row: dict,
    fmt: str,
    source: Source | None = None,
    *,
    text_field: str = "text",
    column_mapping: dict[str, str] | None = None,
    reasoning: str = "field",
    ultrafeedback_rejected: str = "random",
    ultrafeedback_score: str = "auto",
    seed: int = 42,
) -> Example:
    """Convert one raw row of format `fmt` into its canonical example (see the module docstring).

    `column_mapping` ({canonical: your_column}) renames columns first, for any format; with
    fmt="column_mapping" the renamed row's format is detected. Raises DataError
    with a human reason (and `key` = the offending column) or RowSkipped for rows left out on
    purpose.
    """
    if reasoning not in ("field", "drop", "inline"):
        raise DataError(f"reasoning must be field, drop or inline, got '{reasoning}'")
    if ultrafeedback_rejected not in ("random", "worst"):
        raise DataError(f"ultrafeedback_rejected must be random or worst, got '{ultrafeedback_rejected}'")
    if ultrafeedback_score not in ("auto", "fine-grained_score", "overall_score", "annotations"):
        raise DataError(
            "ultrafeedback_score must be auto, fine-grained_score, overall_score or annotations, "
            f"got '{ultrafeedback_score}'"
        )
    opts = _Options(text_field, reasoning, ultrafeedback_rejected, ultrafeedback_score, seed)
    name = canonical_format(fmt)
    if not isinstance(row, dict):
        raise DataError(f"expected a record (object), found {type(row).__name__}", source)
    if column_mapping:
        row = apply_column_mapping(row, column_mapping, source)
    if name == "column_mapping":
        if not column_mapping:
            raise DataError("format column_mapping needs the column_mapping option ({canonical: your_column})", source)
        detected = _detect_row(row, text_field)
        if detected is None:
            raise DataError(
                f"after column_mapping {column_mapping} the row has keys {sorted(row)}, which match no "
                "format; map the fields a format needs (e.g. instruction + output, messages, "
                "prompt + chosen + rejected)",
                source,
            )
        name = detected
    return _CONVERTERS[name](row, source, opts)


def apply_column_mapping(row: dict, columns: dict[str, str], source: Source | None = None) -> dict:
    """The row with columns renamed ({canonical: your_column}); other columns are kept."""
    out = dict(row)
    for canonical, column in columns.items():
        if column not in row:
            raise DataError(
                f"column '{column}' (mapped to '{canonical}') is not in the row.{_did_you_mean(column, row)} "
                f"Row keys: {', '.join(sorted(row))}",
                source,
                key=column,
            )
    # Two passes so that swapping names ({"a": "b", "b": "a"}) works.
    values = {canonical: row[column] for canonical, column in columns.items()}
    for column in columns.values():
        out.pop(column, None)
    out.update(values)
    return out


# ---------------------------------------------------------------------------------------------
# Field access with helpful errors


def _did_you_mean(name: str, row: dict) -> str:
    """For a name the user typed (a column mapping): the existing key they probably meant."""
    close = difflib.get_close_matches(name, [str(k) for k in row], n=1, cutoff=0.75)
    return f" Did you mean '{close[0]}'?" if close else ""


def _typo_in_row(expected: str, row: dict) -> str:
    """For a field the format expects but the data lacks: a data key that looks like a typo of it."""
    close = difflib.get_close_matches(expected, [str(k) for k in row], n=1, cutoff=0.75)
    return f" Found '{close[0]}': a typo of '{expected}'?" if close else ""


def _missing(row: dict, name: str, fmt: str, source: Source | None) -> DataError:
    req, opt, _ = FORMATS[fmt]
    close = difflib.get_close_matches(name, [str(k) for k in row], n=1, cutoff=0.75)
    if close:
        hint = f" The row has '{close[0]}': a typo? Fix the data or map it with column_mapping: {{{name}: {close[0]}}}."
    else:
        hint = f" Row keys: {', '.join(sorted(map(str, row))) or '(none)'}."
    needs = ", ".join(r for r in req if not r.startswith("<"))
    optional = f"; optional {', '.join(opt)}" if opt else ""
    return DataError(f"missing field '{name}' ({fmt} needs {needs}{optional}).{hint}", source, key=name)


def _require(row: dict, name: str, fmt: str, source: Source | None) -> Any:
    if name not in row or row[name] is None:
        raise _missing(row, name, fmt, source)
    return row[name]


def _string(value: Any, name: str, source: Source | None, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"'{name}' must be a string, found {_type_name(value)}", source, key=name)
    if not allow_empty and not value.strip():
        raise DataError(f"'{name}' is empty", source, key=name)
    return value


def _optional_string(row: dict, name: str, source: Source | None) -> str:
    value = row.get(name)
    if value is None:
        return ""
    return _string(value, name, source, allow_empty=True)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Messages


def _first(d: dict, *keys: str) -> tuple[str | None, Any]:
    """The first of `keys` present with a non-null value. Arrow-backed data (parquet, datasets)
    gives every struct all fields of the schema, filling the absent ones with None."""
    for key in keys:
        if d.get(key) is not None:
            return key, d[key]
    return None, None


def _parse_messages(turns: Any, field: str, source: Source | None, opts: _Options) -> list[Message]:
    if isinstance(turns, str):
        raise DataError(
            f"'{field}' must be a list of messages, found a string (is it JSON-encoded? decode it first)",
            source,
            key=field,
        )
    if not isinstance(turns, (list, tuple)):
        raise DataError(f"'{field}' must be a list of messages, found {_type_name(turns)}", source, key=field)
    return [_parse_message(turn, i + 1, field, source, opts) for i, turn in enumerate(turns)]


def _parse_message(turn: Any, number: int, field: str, source: Source | None, opts: _Options) -> Message:
    where = f"{field} turn {number}"
    if not isinstance(turn, dict):
        raise DataError(f"{where} must be an object with role and content, found {_type_name(turn)}", source, key=field)
    role_key, raw_role = _first(turn, "role", "from")
    if raw_role is None and (role_key in turn or "role" in turn or "from" in turn):
        raise DataError(f"{where} '{role_key or 'role'}' must be a string (user, assistant, system, tool), found null",
                        source, key=field)
    if raw_role is None:
        hint = _typo_in_row("role", turn) or _typo_in_row("from", turn)
        raise DataError(f"{where} has no 'role' (or 'from').{hint} Keys: {', '.join(sorted(turn))}", source, key=field)
    role = ROLE_MAP.get(str(raw_role).strip().lower())
    if role is None:
        close = difflib.get_close_matches(str(raw_role).lower(), list(ROLE_MAP), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(
            f"{where} has unknown role '{raw_role}'.{hint} Known roles: {', '.join(ROLE_MAP)}", source, key=field
        )
    content_key, content = _first(turn, "content", "value", "text")
    if content_key is None:
        if not turn.get("tool_calls"):
            hint = _typo_in_row("content", turn) or _typo_in_row("value", turn)
            raise DataError(
                f"{where} ({role}) has no 'content' (or 'value').{hint} Keys: {', '.join(sorted(turn))}",
                source,
                key=field,
            )

    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    call_texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            _parse_part(part, where, source, texts, reasoning, calls, call_texts)
    elif content is None:
        pass
    elif str(raw_role).lower() in _CALL_ROLES and isinstance(content, dict):
        content = json.dumps(content, ensure_ascii=False)
        texts.append(content)
    else:
        raise DataError(
            f"{where} content must be a string or a list of typed parts, found {_type_name(content)}",
            source,
            key=field,
        )

    if str(raw_role).lower() in _CALL_ROLES:
        # ShareGPT function_call: the whole value is the call.
        # Content stays the call's JSON text; tool_calls is added when it parses cleanly.
        text = "".join(texts)
        calls.extend(_calls_from_json(text) or [])
        return _finish_message(role, text, reasoning, calls, [], turn, where, source, opts)

    for key in ("reasoning_content", "reasoning", "thinking"):
        if isinstance(turn.get(key), str) and turn[key].strip():
            reasoning.insert(0, turn[key])
            break
    if turn.get("tool_calls"):
        calls.extend(_normalise_tool_calls(turn["tool_calls"], where, source))
    return _finish_message(role, "".join(texts), reasoning, calls, call_texts, turn, where, source, opts)


def _parse_part(part: Any, where: str, source, texts, reasoning, calls, call_texts) -> None:
    if isinstance(part, str):
        texts.append(part)
        return
    if not isinstance(part, dict):
        raise DataError(f"{where} content part must be an object, found {_type_name(part)}", source)
    ptype = str(part.get("type", "text")).lower()
    _, value = _first(part, "text", "value", "content")
    if ptype in _MEDIA_PARTS:
        raise DataError(f"{where} has a part of type '{ptype}'; only text is supported", source)
    if ptype in _CALL_PARTS:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str):
            raise DataError(f"{where} {ptype} part must hold a JSON string, found {_type_name(value)}", source)
        parsed = _calls_from_json(value)
        if not parsed:
            raise DataError(f"{where} {ptype} part is not a JSON call with a name: {value[:80]!r}", source)
        calls.extend(parsed)
        call_texts.append(value)
        return
    if not isinstance(value, str):
        raise DataError(f"{where} '{ptype}' part must hold a string, found {_type_name(value)}", source)
    if ptype in _REASONING_PARTS:
        reasoning.append(value)
    elif ptype == "text":
        texts.append(value)
    else:
        raise DataError(
            f"{where} has an unsupported '{ptype}' part (supported: text, reasoning, thinking, tool_call)",
            source,
        )


def _finish_message(role, content, reasoning, calls, call_texts, turn, where, source, opts) -> Message:
    if calls and not content.strip():
        # Keep the call visible for templates that ignore tool_calls (see module docstring).
        content = "\n".join(call_texts)
    thought = "\n".join(reasoning)
    if thought and opts.reasoning == "inline":
        content = f"<think>\n{thought}\n</think>\n\n{content}"
    message: Message = {"role": role, "content": content}
    if thought and opts.reasoning == "field":
        message["reasoning_content"] = thought
    if calls:
        message["tool_calls"] = calls
    for key in ("name", "tool_call_id"):
        if isinstance(turn.get(key), str):
            message[key] = turn[key]
    _, weight = _first(turn, "loss_weight", "weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            shown = repr(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else _type_name(weight)
            raise DataError(f"{where} loss_weight must be 0 (not trained) or 1 (trained), found {shown}; token labels "
                            "cannot carry other weights", source)
        message["loss_weight"] = float(weight)
    return message


def _calls_from_json(text: str) -> list[dict] | None:
    """OpenAI-style tool_calls from a call's JSON text, or None when it is not a clean call."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(_make_call(item["name"], item.get("arguments", item.get("parameters", {}))))
    return calls or None


def _make_call(name: str, arguments: Any) -> dict:
    if isinstance(arguments, str):
        # Templates such as Llama-3.1 apply `tojson` to arguments: a dict renders right, a string
        # would be quoted twice.
        try:
            parsed = json.loads(arguments)
            if isinstance(parsed, dict):
                arguments = parsed
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _normalise_tool_calls(value: Any, where: str, source: Source | None) -> list[dict]:
    if isinstance(value, str):
        parsed = _calls_from_json(value)
        if parsed is None:
            raise DataError(f"{where} tool_calls is not valid call JSON", source)
        return parsed
    if not isinstance(value, list):
        raise DataError(f"{where} tool_calls must be a list, found {_type_name(value)}", source)
    calls = []
    for call in value:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where} tool_calls entry has no function name: {str(call)[:80]}", source)
        made = _make_call(fn["name"], fn.get("arguments", {}))
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            made["id"] = call["id"]
        calls.append(made)
    return calls


def _check_conversation(messages: list[Message], field: str, source: Source | None, *, prompt_only: bool = False) -> None:
    """Enforce the conversation rules of the module docstring."""
    if not messages:
        raise DataError(f"'{field}' has no turns", source, key=field)
    prev = None
    for i, m in enumerate(messages, start=1):
        role, content = m["role"], m["content"]
        if role == "system" and i > 1:
            raise DataError(f"{field} turn {i} is a system turn; only the first turn may be system", source, key=field)
        if role != "system" and (prev is None or prev == "system") and role != "user":
            raise DataError(
                f"{field} starts with a{'n' if role == 'assistant' else ''} {role} turn (turn {i}); "
                "the first turn after any system turn must be a user turn",
                source,
                key=field,
            )
        if role == "user" and prev == "user":
            raise DataError(
                f"{field} turns {i - 1} and {i} are both user turns; merge them or add the assistant reply",
                source,
                key=field,
            )
        if role == "tool" and prev not in ("assistant", "tool"):
            raise DataError(f"{field} turn {i} is a tool result that does not follow an assistant turn", source, key=field)
        if role in ("user", "assistant") and not content.strip() and not m.get("tool_calls"):
            raise DataError(f"{field} turn {i} ({role}) is empty", source, key=field)
        prev = role
    if prompt_only:
        if prev == "assistant":
            raise DataError(f"the prompt ({field}) ends with an assistant turn; it should end with the user turn being answered", source, key=field)
        if prev == "system":
            raise DataError(f"the prompt ({field}) has only a system turn", source, key=field)
    elif not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"'{field}' has no assistant turn, so there is nothing to train on", source, key=field)


def _check_reply(messages: list[Message], field: str, source: Source | None) -> None:
    """A completion (chosen, rejected, KTO completion): assistant turns, possibly with tool results."""
    if not messages:
        raise DataError(f"'{field}' is empty", source, key=field)
    if messages[0]["role"] != "assistant":
        raise DataError(f"'{field}' must start with an assistant turn, found {messages[0]['role']}", source, key=field)
    for i, m in enumerate(messages, start=1):
        if m["role"] not in ("assistant", "tool"):
            raise DataError(f"'{field}' turn {i} is a {m['role']} turn; a reply holds assistant (and tool) turns only", source, key=field)
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(f"'{field}' turn {i} (assistant) is empty", source, key=field)


def _parse_tools(row: dict, source: Source | None) -> list[dict] | None:
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"'tools' is not valid JSON: {e.msg} at column {e.colno}", source, key="tools") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"'tools' must be a list of objects, found {_type_name(value)}", source, key="tools")
    return value or None


def _with_system(messages: list[Message], row: dict, source: Source | None) -> list[Message]:
    system = _optional_string(row, "system", source)
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


# ---------------------------------------------------------------------------------------------
# SFT converters


def _instruction_chat(row, source, fmt, instruction_key, input_key, output_key) -> ChatExample:
    instruction = _string(_require(row, instruction_key, fmt, source), instruction_key, source, allow_empty=True)
    extra = _optional_string(row, input_key, source) if input_key else ""
    output = _string(_require(row, output_key, fmt, source), output_key, source)
    user = "\n\n".join(p for p in (instruction, extra) if p.strip())
    if not user:
        raise DataError(f"'{instruction_key}' is empty", source, key=instruction_key)
    messages: list[Message] = []
    history = row.get("history")
    if history:
        if not isinstance(history, list):
            raise DataError(f"'history' must be a list of [user, assistant] pairs, found {_type_name(history)}", source, key="history")
        for i, pair in enumerate(history, start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) and p.strip() for p in pair)):
                raise DataError(f"'history' entry {i} must be a pair of non-empty strings [user, assistant]", source, key="history")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return ChatExample(_with_system(messages, row, source), source)


def _convert_alpaca(row, source, opts):
    return _instruction_chat(row, source, "alpaca", "instruction", "input", "output")


def _convert_icr(row, source, opts):
    if "context" not in row:
        raise _missing(row, "context", "instruction_context_response", source)
    return _instruction_chat(row, source, "instruction_context_response", "instruction", "context", "response")


def _convert_ir(row, source, opts):
    return _instruction_chat(row, source, "instruction_response", "instruction", None, "response")


def _convert_text(row, source, opts):
    field = opts.text_field
    if field not in row or row[field] is None:
        close = difflib.get_close_matches(field, [str(k) for k in row], n=1, cutoff=0.75)
        hint = f" The row has '{close[0]}': a typo?" if close else ""
        raise DataError(
            f"missing text column '{field}'.{hint} Row keys: {', '.join(sorted(row))}. "
            "Set text_field to the column that holds the text.",
            source,
            key=field,
        )
    return TextExample(_string(row[field], field, source), source)


def _convert_messages_field(field: str, fmt: str):
    def convert(row, source, opts):
        messages = _parse_messages(_require(row, field, fmt, source), field, source, opts)
        messages = _with_system(messages, row, source)
        _check_conversation(messages, field, source)
        return ChatExample(messages, source, _parse_tools(row, source))

    return convert


def _convert_prompt_completion(row, source, opts):
    prompt = _require(row, "prompt", "prompt_completion", source)
    completion = _require(row, "completion", "prompt_completion", source)
    if isinstance(prompt, str) and isinstance(completion, str):
        return CompletionExample(_string(prompt, "prompt", source, allow_empty=True), _string(completion, "completion", source), source)
    prompt_msgs = _as_messages(prompt, "prompt", "user", source, opts)
    reply = _as_messages(completion, "completion", "assistant", source, opts)
    prompt_msgs = _with_system(prompt_msgs, row, source)
    _check_conversation(prompt_msgs, "prompt", source, prompt_only=True)
    _check_reply(reply, "completion", source)
    return ChatExample(prompt_msgs + reply, source, _parse_tools(row, source))


def _as_messages(value: Any, field: str, default_role: str, source, opts) -> list[Message]:
    """A string is one `default_role` turn; a dict is one message; a list is a conversation."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"'{field}' is empty", source, key=field)
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_parse_message(value, 1, field, source, opts)]
    return _parse_messages(value, field, source, opts)


# ---------------------------------------------------------------------------------------------
# Preference converters

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _looks_like_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def _parse_hh(text: str, field: str, source: Source | None) -> list[Message]:
    """Anthropic HH dialogue text -> messages. A trailing empty "Assistant:" is dropped."""
    parts = _HH_TURN.split(text.lstrip(" \t"))
    if parts[0].strip():
        raise DataError(f"'{field}' has text before the first 'Human:' marker: {parts[0][:60]!r}", source, key=field)
    messages = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]
    if not messages:
        raise DataError(f"'{field}' has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns", source, key=field)
    return messages


def _shared_prefix(chosen: list[Message], rejected: list[Message], source) -> int:
    """Length of the prompt shared by two full conversations: up to the first differing turn,
    backed off to just before an assistant turn so both continuations are replies."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (
        k < len(chosen) and k < len(rejected)
        and chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"
    ):
        k -= 1
    if k == 0:
        if chosen == rejected:
            raise RowSkipped("chosen and rejected are identical; the pair carries no preference", source, "identical chosen/rejected")
        raise DataError(
            "chosen and rejected share no prompt turns before their replies; give the prompt "
            "separately (prompt column) or make both full conversations with the same opening turns",
            source,
            key="chosen",
        )
    return k


def _preference(prompt, chosen, rejected, row, source, *, scores=(None, None)) -> PreferenceExample:
    prompt = _with_system(prompt, row, source)
    _check_conversation(prompt, "prompt", source, prompt_only=True)
    _check_reply(chosen, "chosen", source)
    _check_reply(rejected, "rejected", source)
    if chosen == rejected:
        raise RowSkipped("chosen and rejected are identical; the pair carries no preference", source, "identical chosen/rejected")
    return PreferenceExample(prompt, chosen, rejected, source, _parse_tools(row, source), *scores)


def _split_implicit(chosen, rejected, source):
    k = _shared_prefix(chosen, rejected, source)
    return chosen[:k], chosen[k:], rejected[k:]


def _scores(row: dict, source) -> tuple[float | None, float | None]:
    out = []
    for key in ("score_chosen", "score_rejected"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"'{key}' must be a number, found {_type_name(value)}", source, key=key)
        out.append(None if value is None else float(value))
    return out[0], out[1]


def _convert_preference(row, source, opts, fmt="preference"):
    chosen_raw = _require(row, "chosen", fmt, source)
    rejected_raw = _require(row, "rejected", fmt, source)
    prompt_raw = row.get("prompt")
    if prompt_raw is None:
        if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
            raise DataError(
                "chosen/rejected are strings but there is no 'prompt' column."
                f"{_typo_in_row('prompt', row)} Add a prompt, map one with column_mapping: {{prompt: your_column}}, "
                "or use format hh_rlhf for raw Anthropic HH text",
                source,
                key="prompt",
            )
        chosen = _as_messages(chosen_raw, "chosen", "assistant", source, opts)
        rejected = _as_messages(rejected_raw, "rejected", "assistant", source, opts)
        prompt, chosen, rejected = _split_implicit(chosen, rejected, source)
    else:
        if isinstance(prompt_raw, str) and _looks_like_hh(prompt_raw):
            prompt = _parse_hh(prompt_raw, "prompt", source)
            if prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
                prompt = prompt[:-1]
        else:
            prompt = _as_messages(prompt_raw, "prompt", "user", source, opts)
        chosen = _as_messages(chosen_raw, "chosen", "assistant", source, opts)
        rejected = _as_messages(rejected_raw, "rejected", "assistant", source, opts)
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            # Full conversations beside a prompt column (HuggingFaceH4/ultrafeedback_binarized):
            # the prompt turns are repeated inside chosen/rejected; take them from there.
            prompt, chosen, rejected = _split_implicit(chosen, rejected, source)
    return _preference(prompt, chosen, rejected, row, source, scores=_scores(row, source))


def _convert_ufb(row, source, opts):
    for key in ("score_chosen", "score_rejected"):
        _require(row, key, "ultrafeedback_binarized", source)
    _require(row, "prompt", "ultrafeedback_binarized", source)
    return _convert_preference(row, source, opts, fmt="ultrafeedback_binarized")


def _convert_sharegpt_preference(row, source, opts):
    fmt = "sharegpt_preference"
    prompt = _parse_messages(_require(row, "conversations", fmt, source), "conversations", source, opts)
    chosen = _as_messages(_require(row, "chosen", fmt, source), "chosen", "assistant", source, opts)
    rejected = _as_messages(_require(row, "rejected", fmt, source), "rejected", "assistant", source, opts)
    return _preference(prompt, chosen, rejected, row, source)


def _convert_preference_messages(row, source, opts):
    fmt = "preference_messages"
    chosen = _parse_messages(_require(row, "chosen_messages", fmt, source), "chosen_messages", source, opts)
    rejected = _parse_messages(_require(row, "rejected_messages", fmt, source), "rejected_messages", source, opts)
    prompt, chosen, rejected = _split_implicit(chosen, rejected, source)
    return _preference(prompt, chosen, rejected, row, source)


def _convert_hh(row, source, opts):
    chosen = _parse_hh(_string(_require(row, "chosen", "hh_rlhf", source), "chosen", source), "chosen", source)
    rejected = _parse_hh(_string(_require(row, "rejected", "hh_rlhf", source), "rejected", source), "rejected", source)
    prompt, chosen, rejected = _split_implicit(chosen, rejected, source)
    return _preference(prompt, chosen, rejected, row, source)


def _uf_score(completion: dict, how: str) -> float | None:
    def number(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)):
            return None if math.isnan(v) else float(v)
        if isinstance(v, str):
            try:
                f = float(v)
            except ValueError:  # "N/A" ratings
                return None
            return None if math.isnan(f) else f
        return None

    def annotations():
        ann = completion.get("annotations")
        if not isinstance(ann, dict):
            return None
        ratings = [number(a.get("Rating") if isinstance(a, dict) else a) for a in ann.values()]
        ratings = [r for r in ratings if r is not None]
        return sum(ratings) / len(ratings) if ratings else None

    if how == "annotations":
        return annotations()
    if how in ("fine-grained_score", "overall_score"):
        return number(completion.get(how))
    for attempt in (lambda: number(completion.get("fine-grained_score")), annotations,
                    lambda: number(completion.get("overall_score"))):
        value = attempt()
        if value is not None:
            return value
    return None


def _convert_ultrafeedback(row, source, opts):
    fmt = "ultrafeedback"
    instruction = _string(_require(row, "instruction", fmt, source), "instruction", source)
    completions = _require(row, "completions", fmt, source)
    if not isinstance(completions, list):
        raise DataError(f"'completions' must be a list, found {_type_name(completions)}", source, key="completions")
    scored = []
    for i, c in enumerate(completions, start=1):
        if not isinstance(c, dict):
            raise DataError(f"completions entry {i} must be an object, found {_type_name(c)}", source, key="completions")
        response = c.get("response")
        if not isinstance(response, str) or not response.strip():
            continue  # an empty or missing response cannot be chosen or rejected
        score = _uf_score(c, opts.ultrafeedback_score)
        if score is not None:
            scored.append((score, i, response))
    if len(scored) < 2:
        raise RowSkipped(
            f"only {len(scored)} completion(s) with a response and a rating; a pair needs two",
            source,
            "fewer than 2 rated completions",
        )
    best = max(s for s, _, _ in scored)
    chosen = next(c for c in scored if c[0] == best)  # first of the best, for determinism
    lower = [c for c in scored if c[0] < best]
    if not lower:
        raise RowSkipped(f"all rated completions tie at {best:g}", source, "ultrafeedback tie")
    if opts.ultrafeedback_rejected == "worst":
        worst = min(s for s, _, _ in lower)
        rejected = next(c for c in lower if c[0] == worst)
    else:
        # Seeded by the prompt text, not the row position, so the choice survives shuffling.
        digest = hashlib.sha256(f"{opts.seed}\0{instruction}".encode()).digest()
        rejected = random.Random(int.from_bytes(digest[:8], "big")).choice(lower)
    return PreferenceExample(
        prompt=[{"role": "user", "content": instruction}],
        chosen=[{"role": "assistant", "content": chosen[2]}],
        rejected=[{"role": "assistant", "content": rejected[2]}],
        source=source,
        score_chosen=chosen[0],
        score_rejected=rejected[0],
    )


# ---------------------------------------------------------------------------------------------
# KTO


def _label(value: Any, source) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"'label' must be true/false (or 1/0), found {_type_name(value)}", source, key="label")


def _convert_kto(row, source, opts):
    label = _label(_require(row, "label", "kto", source), source)
    field = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if field is not None:
        messages = _with_system(_parse_messages(row[field], field, source, opts), row, source)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"'{field}' must end with the assistant turn being labelled", source, key=field)
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _as_messages(_require(row, "prompt", "kto", source), "prompt", "user", source, opts)
        completion = _as_messages(_require(row, "completion", "kto", source), "completion", "assistant", source, opts)
        prompt = _with_system(prompt, row, source)
    _check_conversation(prompt, "prompt", source, prompt_only=True)
    _check_reply(completion, "completion", source)
    return KTOExample(prompt, completion, label, source)


_CONVERTERS = {
    "alpaca": _convert_alpaca,
    "instruction_context_response": _convert_icr,
    "instruction_response": _convert_ir,
    "prompt_completion": _convert_prompt_completion,
    "messages": _convert_messages_field("messages", "messages"),
    "sharegpt": _convert_messages_field("conversations", "sharegpt"),
    "text": _convert_text,
    "preference": _convert_preference,
    "sharegpt_preference": _convert_sharegpt_preference,
    "preference_messages": _convert_preference_messages,
    "hh_rlhf": _convert_hh,
    "ultrafeedback": _convert_ultrafeedback,
    "ultrafeedback_binarized": _convert_ufb,
    "kto": _convert_kto,
}
