"""Masking: turn an example into input_ids and labels (IGNORE_INDEX where a token is not trained).

Every function here is pure: (example, tokenizer, template) -> tokens, so a mask can be printed
(`render_tokens`) and tested token by token.

Chat (`tokenize_chat`)
    The conversation is rendered once with the chat template (`apply_chat_template(tokenize=False)`).
    For each assistant message i the template itself says where that turn starts and ends:
        prompt_i = render(messages[:i], add_generation_prompt=True)
        upto_i   = render(messages[:i+1])
    prompt_i must be a string prefix of the full rendering and of upto_i, so the turn starts at
    len(prompt_i). It ends right after the template's end-of-turn token (templates.end_of_turn_token:
    <|im_end|>, <|eot_id|>, <|end|>, eos for llama-2/mistral/alpaca), found in the stretch where
    upto_i and the full rendering agree. What follows the end of turn (the "\\n" after <|im_end|>, the
    eos phi-3 appends after the last message) is not trained: at inference the model stops at the end
    of turn and never produces it. (TRL's own training templates for Qwen2.5 and Phi-3 put that "\\n"
    inside {% generation %}; ours does not: a deliberate difference of one token per turn.)
    No {% generation %} tags are needed, so any prefix-preserving template works, including the
    model's own.

    Characters are mapped to tokens with the fast tokenizer's offset mapping on the whole rendering,
    so the ids are exactly those of tokenising the full text (what the model trains on). A token is
    trained when any of its characters lies in a trained span: the same rule as transformers'
    return_assistant_tokens_mask (char_to_token over {% generation %} spans). Turn boundaries of the
    built-in templates are special tokens or newlines, where no token can straddle. Tokenizers
    without offsets fall back to tokenising each prefix text[:boundary] and checking it is a token
    prefix of the whole; a boundary inside a token then raises DataError.

    The rendered text is tokenised with add_special_tokens=False: templates write bos_token
    themselves, so a tokenizer that adds BOS would otherwise double it.

    A per-turn "loss_weight" (LLaMA-Factory's, kept by formats.py, which accepts only 0 and 1: token
    labels cannot carry fractional weights) decides for its turn under either loss_on: 0 = shown but
    not trained (the whole turn, header and end of turn included, under loss_on "all"), 1 = trained
    (a user or system turn too, its rendering from the end of the previous turn to its own end).
    Turns without one follow loss_on.

    Raised (DataError, with the example's source): a template that is not prefix-preserving (it
    rewrites earlier turns once later ones exist; the message shows both texts at the first
    difference), an end-of-turn token missing from a turn or occurring inside its content, an
    assistant message first, tools given to a template that never reads `tools` (or an assistant
    turn whose only content is tool_calls the template ignores), and any error the template raises.

Text, completion and preference
    `tokenize_text`: BOS if the tokenizer adds one, the text, EOS; all trained.
    `tokenize_completion`: BOS, prompt + completion (tokenised together, split by offsets), EOS; the
    prompt is masked when completion_only.
    `tokenize_preference`: the prompt rendered with the generation prompt; each completion is the
    rest of the full rendering up to its last end-of-turn token. When the prompt's tokens are a prefix
    of the full rendering's tokens the completion tokens are the remainder; when tokenisation merges
    across the boundary the completion text is tokenised on its own (what the model sees when it
    generates after the prompt).

Length
    `max_length` on these functions truncates (chat, text, completion keep the start; preference
    keeps the end of the prompt and the start of completions). `apply_overlong` is the policy helper
    for "truncate" | "drop" | "error"; callers count what it did.

Warnings
    `check_trained_tokens` returns sentences for people (the CLI prints them): pad == eos, an end-of-turn
    text that is not a single token, an unknown end of turn, and an end-of-turn token that no example
    trains.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterable, Literal, Sequence

from lmpipeline.data.templates import end_of_turn_token, render
from lmpipeline.data.types import (
    IGNORE_INDEX,
    ChatExample,
    CompletionExample,
    DataError,
    PreferenceExample,
    TextExample,
    TokenizedExample,
    TokenizedPair,
)

LossOn = Literal["assistant", "all"]
OverlongPolicy = Literal["truncate", "drop", "error"]

__all__ = [
    "tokenize_chat",
    "assistant_char_spans",
    "tokenize_text",
    "tokenize_completion",
    "tokenize_preference",
    "tokenize_prompt_completions",
    "apply_overlong",
    "check_trained_tokens",
    "render_tokens",
    "token_table",
]


# --------------------------------------------------------------------------------------------- chat


def tokenize_chat(
    example: ChatExample,
    tokenizer: Any,
    chat_template: str,
    *,
    loss_on: LossOn = "assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
) -> TokenizedExample:
    """Render and tokenise a conversation; labels train assistant turns (content + end of turn) or all.

    `chat_template` is Jinja text (templates.resolve_chat_template). `end_of_turn` overrides the
    template's end-of-turn text. `max_length` keeps the first max_length tokens.
    """
    try:
        _check_template_reads(example.messages, example.tools, chat_template)
        full = render(tokenizer, chat_template, example.messages, tools=example.tools)
        if loss_on == "all":
            spans = _without(0, len(full), weighted_turn_spans(example.messages, tokenizer, chat_template, full,
                                                               example.tools, weight=0))
        elif loss_on == "assistant":
            eot = end_of_turn if end_of_turn is not None else end_of_turn_token(chat_template, tokenizer)
            spans = assistant_char_spans(example.messages, tokenizer, chat_template, full, eot, example.tools)
            spans += weighted_turn_spans(example.messages, tokenizer, chat_template, full, example.tools, weight=1,
                                         roles_other_than="assistant")
        else:
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
        ids, trained = _tokenize_with_spans(full, spans, tokenizer)
    except DataError as e:
        _reraise(e, example.source)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=ids, labels=labels, source=example.source)


def assistant_char_spans(
    messages: list[dict],
    tokenizer: Any,
    chat_template: str,
    full: str,
    end_of_turn: str | None,
    tools: list[dict] | None = None,
) -> list[tuple[int, int]]:
    """Character spans [start, end) of `full` to train: each assistant turn's content + end of turn.

    `full` is render(messages). See the module docstring for the method and what it raises.
    """
    spans: list[tuple[int, int]] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if message.get("loss_weight") == 0:  # LLaMA-Factory v1 per-turn weight: shown, not trained
            continue
        if i == 0:
            raise DataError(
                "the conversation starts with an assistant message: there is no prompt to condition it "
                "on; drop that message or add the user turn it answers"
            )
        prompt = _render_part(tokenizer, chat_template, messages[:i], True, tools, i)
        upto = full if i == last else _render_part(tokenizer, chat_template, messages[: i + 1], False, tools, i + 1)
        if not full.startswith(prompt):
            raise _prefix_error(
                f"the first {i} messages rendered with the generation prompt", prompt, "the whole conversation", full
            )
        if not upto.startswith(prompt):
            raise _prefix_error(
                f"the first {i} messages rendered with the generation prompt",
                prompt,
                f"the first {i + 1} messages (ending with assistant message {i})",
                upto,
            )
        start = len(prompt)
        agreed = start + _common_prefix_len(upto[start:], full[start:])
        region = full[start:agreed]
        if end_of_turn:
            k = region.find(end_of_turn)
            if k < 0:
                raise DataError(
                    f"assistant message {i}: its rendering {_clip(region)!r} does not contain the end-of-turn "
                    f"token {end_of_turn!r}; the chat template does not close turns with it (set chat_template "
                    "to a template that ends each turn with one token, e.g. a built-in name)"
                )
            if region.find(end_of_turn, k + len(end_of_turn)) >= 0:
                raise DataError(
                    f"assistant message {i} contains the end-of-turn token {end_of_turn!r} inside its text; "
                    "training on it would teach the model to stop mid-answer. Clean the data"
                )
            end = start + k + len(end_of_turn)
        else:
            if i != last and not full.startswith(upto):
                raise DataError(
                    f"cannot tell where assistant message {i} ends: the chat template's end-of-turn token is "
                    "unknown and the template writes text after the last message. Set chat_template to a template that "
                    "ends each turn with a known token (e.g. a built-in name)"
                )
            end = start + len(region.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def weighted_turn_spans(messages: list[dict], tokenizer: Any, chat_template: str, full: str,
                        tools: list[dict] | None, *, weight: float,
                        roles_other_than: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the turns whose loss_weight is `weight`: from the end of the previous turn's
    rendering to the end of this one's (its header, content and end of turn)."""
    spans = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message.get("loss_weight") != weight or message.get("role") == roles_other_than:
            continue
        start = len(_render_part(tokenizer, chat_template, messages[:i], False, tools, i)) if i else 0
        upto = full if i == last else _render_part(tokenizer, chat_template, messages[: i + 1], False, tools, i + 1)
        if not full.startswith(upto):
            raise _prefix_error(f"the first {i + 1} messages", upto, "the whole conversation", full)
        if len(upto) > start:
            spans.append((start, len(upto)))
    return spans


def _without(start: int, end: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) minus the (sorted, disjoint) `holes`."""
    out, at = [], start
    for a, b in sorted(holes):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if end > at:
        out.append((at, end))
    return out


def _render_part(tokenizer, chat_template, messages, add_generation_prompt, tools, n) -> str:
    try:
        return render(tokenizer, chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except DataError as e:
        raise DataError(
            f"the chat template cannot render the first {n} messages on their own (masking renders each "
            f"prefix of the conversation to find the assistant turns): {e.reason}"
        ) from e


def _check_template_reads(messages: list[dict], tools: list[dict] | None, chat_template: str) -> None:
    # A template that never mentions `tools` or `tool_calls` drops them without a trace; the model
    # would then be trained on answers to questions it was never shown.
    if tools and "tools" not in chat_template:
        raise DataError(
            "the example defines tools but the chat template never reads `tools`, so they would be "
            "silently dropped; use a template with tool support (e.g. qwen2.5)"
        )
    # formats.py copies the calls' JSON into an otherwise empty content so that such templates still
    # show them; a call with neither reaches the template as an empty turn.
    if "tool_calls" not in chat_template:
        for i, m in enumerate(messages):
            if m.get("tool_calls") and not str(m.get("content") or "").strip():
                raise DataError(
                    f"message {i} has tool_calls and no text, and the chat template never reads "
                    "`tool_calls`: it would render as an empty turn; use a template with tool support "
                    "(e.g. qwen2.5)"
                )


def _prefix_error(what_a: str, a: str, what_b: str, b: str) -> DataError:
    k = _common_prefix_len(a, b)
    lo = max(0, k - 40)
    return DataError(
        "the chat template is not prefix-preserving, so assistant turns cannot be located exactly: "
        f"{what_a} is not a prefix of {what_b}. They differ at character {k}: "
        f"{a[lo:k + 40]!r} vs {b[lo:k + 40]!r}. Templates that rewrite earlier turns (e.g. drop past "
        "reasoning or re-date the system prompt) need a training variant; or use a built-in template"
    )


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on C-speed slice compares
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


# ------------------------------------------------------------------------------- spans -> tokens


def _tokenize_with_spans(
    text: str, spans: Sequence[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (no special tokens added) and, per token, whether it overlaps a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return _tokenize_with_spans_by_prefix(text, spans, tokenizer)
    ids = list(enc["input_ids"])
    trained = [False] * len(ids)
    j = 0
    for t, (s, e) in enumerate(offsets):
        # offsets are non-decreasing; skip spans that end before this token starts
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            break
        a, b = spans[j]
        trained[t] = (s < b and e > a) if e > s else (a <= s < b)
    return ids, trained


def _tokenize_with_spans_by_prefix(
    text: str, spans: Sequence[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[bool]]:
    # Slower path for tokenizers without offsets: the token index of a character boundary is the
    # length of the tokenisation of the text before it, valid only if that is a prefix of the whole.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    trained = [False] * len(ids)
    for a, b in spans:
        bounds = []
        for c in (a, b):
            head = list(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) if c else []
            if ids[: len(head)] != head:
                raise DataError(
                    f"tokenisation merges characters across the mask boundary at character {c} "
                    f"({_clip(text[max(0, c - 20):c + 20])!r}); this tokenizer has no offset mapping to "
                    "resolve it. Use a fast tokenizer"
                )
            bounds.append(len(head))
        for t in range(bounds[0], bounds[1]):
            trained[t] = True
    return ids, trained


# ------------------------------------------------------------------------------ text, completion

_bos_cache: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of text when add_special_tokens=True (usually [bos] or [])."""
    try:
        return _bos_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix: list[int] = []
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k : k + len(without)] == without:
            prefix = with_special[:k]
            break
    try:
        _bos_cache[tokenizer] = prefix
    except TypeError:  # not weak-referenceable: just don't cache
        pass
    return prefix


def _eos_id(tokenizer: Any, source) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos token, so examples cannot end with one; set add_eos=False "
                        "or give the tokenizer an eos_token", source=source)
    return eos


def tokenize_text(
    example: TextExample, tokenizer: Any, *, max_length: int | None = None, add_eos: bool = True
) -> TokenizedExample:
    """BOS (if the tokenizer adds one) + text + EOS, every token trained; keeps the first max_length."""
    ids = _bos_prefix(tokenizer) + list(tokenizer(example.text, add_special_tokens=False)["input_ids"])
    if add_eos:
        eos = _eos_id(tokenizer, example.source)
        if not ids or ids[-1] != eos:
            ids.append(eos)
    if max_length is not None:
        ids = ids[:max_length]
    return TokenizedExample(input_ids=ids, labels=list(ids), source=example.source)


def tokenize_completion(
    example: CompletionExample,
    tokenizer: Any,
    *,
    completion_only: bool,
    max_length: int | None = None,
) -> TokenizedExample:
    """BOS + prompt + completion + EOS. With completion_only the prompt (and BOS) are masked.

    prompt + completion is tokenised as one string and split at len(prompt) by offsets, so the ids are
    exactly the whole string's. TRL instead splits at the prompt's own token count; the two agree
    unless a token straddles the boundary, which is trained here.
    """
    text = example.prompt + example.completion
    span = [(len(example.prompt), len(text))] if completion_only else [(0, len(text))]
    try:
        body, trained = _tokenize_with_spans(text, span, tokenizer)
    except DataError as e:
        _reraise(e, example.source)
    prefix = _bos_prefix(tokenizer)
    ids = prefix + body
    keep = [not completion_only] * len(prefix) + trained
    eos = _eos_id(tokenizer, example.source)
    if not ids or ids[-1] != eos:
        ids.append(eos)
        keep.append(True)
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=ids, labels=labels, source=example.source)


# ----------------------------------------------------------------------------------- preference


def tokenize_preference(
    example: PreferenceExample,
    tokenizer: Any,
    chat_template: str,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    end_of_turn: str | None = None,
) -> TokenizedPair:
    """Prompt tokens once, then chosen and rejected completion tokens (content + end of turn).

    Truncation: the prompt keeps its last max_prompt_length tokens; then each completion keeps its
    first max_length - len(prompt) tokens. A prompt that leaves no room raises DataError (the caller
    counts and drops it).
    """
    prompt_ids, (chosen_ids, rejected_ids) = tokenize_prompt_completions(
        example.prompt, {"chosen": example.chosen, "rejected": example.rejected}, tokenizer, chat_template,
        tools=example.tools, source=example.source, end_of_turn=end_of_turn)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(
                f"the prompt is {len(prompt_ids)} tokens, leaving no room for completions within "
                f"max_length={max_length}; set max_prompt_length below max_length",
                source=example.source,
            )
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return TokenizedPair(prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids,
                         source=example.source)


def tokenize_prompt_completions(
    prompt: list[dict],
    completions: dict[str, list[dict]],
    tokenizer: Any,
    chat_template: str,
    *,
    tools: list[dict] | None = None,
    source=None,
    end_of_turn: str | None = None,
) -> tuple[list[int], list[list[int]]]:
    """(prompt tokens rendered with the generation prompt, each completion's tokens: content + end of
    turn), for the named completions of one prompt (a preference pair's chosen/rejected, a KTO row's one
    completion). The names only label errors. Raises DataError, with `source`."""
    try:
        eot = end_of_turn if end_of_turn is not None else end_of_turn_token(chat_template, tokenizer)
        if not prompt:
            raise DataError("the preference pair has no prompt messages")
        _check_template_reads(prompt + [m for ms in completions.values() for m in ms], tools, chat_template)
        prompt_text = render(tokenizer, chat_template, prompt, add_generation_prompt=True, tools=tools)
        prompt_ids = _encode(tokenizer, prompt_text)
        out = []
        for which, messages in completions.items():
            if not messages:
                raise DataError(f"the {which} completion is empty")
            full = render(tokenizer, chat_template, prompt + messages, tools=tools)
            if not full.startswith(prompt_text):
                raise _prefix_error("the prompt rendered with the generation prompt", prompt_text,
                                    f"the prompt followed by the {which} messages", full)
            start = len(prompt_text)
            end = _completion_end(full, start, eot, which)
            ids = _encode(tokenizer, full[:end])
            if ids[: len(prompt_ids)] == prompt_ids:
                out.append(ids[len(prompt_ids) :])
            else:  # a token straddles the prompt/completion boundary: tokenise the completion alone
                out.append(_encode(tokenizer, full[start:end]))
    except DataError as e:
        _reraise(e, source)
    return prompt_ids, out


def _completion_end(full: str, start: int, eot: str | None, which: str) -> int:
    if eot:
        k = full.rfind(eot, start)
        if k < 0:
            raise DataError(f"the {which} completion {_clip(full[start:])!r} does not contain the "
                            f"end-of-turn token {eot!r}")
        return k + len(eot)
    return start + len(full[start:].rstrip())


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------ over-long


def apply_overlong(
    example: TokenizedExample, max_length: int, policy: OverlongPolicy
) -> TokenizedExample | None:
    """Apply the over-long policy: the example as is when it fits; else truncated ("truncate"), None
    ("drop"), or DataError ("error"). The caller compares lengths to count what happened."""
    if len(example.input_ids) <= max_length:
        return example
    if policy == "truncate":
        return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length], example.source)
    if policy == "drop":
        return None
    if policy == "error":
        raise DataError(
            f"example is {len(example.input_ids)} tokens, over max_length={max_length} "
            "(overlong policy 'error'; use 'truncate' or 'drop' to continue)",
            source=example.source,
        )
    raise ValueError(f"overlong policy must be 'truncate', 'drop' or 'error', got {policy!r}")


# ------------------------------------------------------------------------------------- warnings


def check_trained_tokens(
    examples: Iterable[TokenizedExample], tokenizer: Any, chat_template: str | None = None
) -> list[str]:
    """Problems that make training quietly wrong, as sentences for people (empty list when none).

    Checks the tokenizer (pad == eos), the template's end of turn (unknown, or not one token) and,
    over `examples`, that the end-of-turn token is trained at least once. Pass chat_template=None
    for non-chat data (only the tokenizer check runs)."""
    out: list[str] = []
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if pad is not None and pad == eos:
        out.append(
            f"pad token == eos token ({tokenizer.eos_token!r}, id {eos}): any collator that masks labels by "
            "pad id also hides every EOS from the loss, and the model never learns to stop. lmpipeline's "
            "collators mask padding by position, not id; with another collator set a distinct pad token"
        )
    if chat_template is None:
        return out
    eot = end_of_turn_token(chat_template, tokenizer)
    if eot is None:
        out.append(
            "cannot tell this chat template's end-of-turn token; each assistant turn is trained up to the "
            "end of its rendered text (trailing whitespace excluded). If that is wrong, set chat_template to "
            "a template that ends each turn with a known token (e.g. a built-in name)"
        )
        return out
    eot_ids = _encode(tokenizer, eot)
    if len(eot_ids) != 1:
        out.append(
            f"end-of-turn {eot!r} is not a single token for this tokenizer (it encodes to {len(eot_ids)} "
            "tokens): the model must learn to spell it to stop, and generation must stop on a string. Add it "
            "as a special token (and resize the embeddings) or use a template whose end of turn is eos"
        )
        return out
    examples = list(examples)
    if examples and not any(eot_ids[0] in ex.labels for ex in examples):
        out.append(
            f"the end-of-turn token {eot!r} (id {eot_ids[0]}) is never trained in these {len(examples)} "
            "examples, so the model will not learn to stop; check loss_on, the template and truncation"
        )
    return out


# -------------------------------------------------------------------------------------- display

_GREEN = ("\x1b[30;42m", "\x1b[30;102m")  # trained tokens, alternating so token boundaries show
_GREY = ("\x1b[37;100m", "\x1b[90;47m")  # masked tokens
_RESET = "\x1b[0m"


def token_table(example: TokenizedExample, tokenizer: Any) -> list[tuple[int, int, str, bool]]:
    """(position, id, decoded text, trained) for every token: the data for an inspect table."""
    return [
        (i, tid, tokenizer.decode([tid]), label != IGNORE_INDEX)
        for i, (tid, label) in enumerate(zip(example.input_ids, example.labels))
    ]


def render_tokens(example: TokenizedExample, tokenizer: Any, color: bool | None = None) -> str:
    """A printable view of what is trained.

    color=True: every token coloured (green shades trained, grey shades masked, alternating so
    boundaries show). color=False: runs of trained tokens wrapped in [[...]], decoded as a run so
    multi-byte characters read correctly. color=None picks colour when stdout is a terminal and
    NO_COLOR is unset.
    """
    if color is None:
        color = _stdout_is_tty() and not os.environ.get("NO_COLOR")
    trained = [label != IGNORE_INDEX for label in example.labels]
    if color:
        parts = []
        for i, (tid, keep) in enumerate(zip(example.input_ids, trained)):
            palette = _GREEN if keep else _GREY
            parts.append(palette[i % 2] + tokenizer.decode([tid]) + _RESET)
        return "".join(parts)
    parts, i, n = [], 0, len(trained)
    while i < n:
        j = i
        while j < n and trained[j] == trained[i]:
            j += 1
        text = tokenizer.decode(example.input_ids[i:j])
        parts.append(f"[[{text}]]" if trained[i] else text)
        i = j
    return "".join(parts)


def render_legend(color: bool) -> str:
    """The key to render_tokens' marks, printed once above the examples."""
    if color:
        return (f"legend: {_GREEN[0]}trained{_RESET} tokens (in the loss) in green, {_GREY[0]}masked{_RESET} tokens "
                "(read as context, not trained) in grey; the shades alternate token by token so boundaries show")
    return ("legend: [[...]] marks trained tokens (in the loss); text outside the brackets is masked (read as "
            "context, not trained). Special tokens such as <|im_end|> appear as their text")


def _stdout_is_tty() -> bool:
    import sys

    return hasattr(sys.stdout, "isatty") and sys.stdout.isatty()


def _reraise(error: DataError, source) -> None:
    """Re-raise a DataError with the example's source attached (unless it already names one)."""
    if error.source is not None or source is None:
        raise error
    raise DataError(error.reason, source=source, key=error.key) from error
