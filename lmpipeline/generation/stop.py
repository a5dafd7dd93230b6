"""Where a sample ends: eos ids (checked on the device by the decode step) and stop strings
(checked here, on decoded text, each time the engine reads the slots back)."""

from __future__ import annotations

from typing import Sequence


def eos_cut(tokens: Sequence[int], eos_ids: Sequence[int]) -> int | None:
    """Length up to and including the first eos id, or None."""
    ids = set(eos_ids)
    return next((i + 1 for i, t in enumerate(tokens) if t in ids), None)


def find_stop_string(decode, tokens: Sequence[int], stops: Sequence[str], checked: int) -> tuple[int, str] | None:
    """(tokens to keep, text before the stop string) for the first token whose prefix text holds a
    stop string, looking from token `checked` on (earlier prefixes were already found clean)."""
    for end in range(max(checked, 1), len(tokens) + 1):
        text = decode(tokens[:end])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return end, text[:min(hits)]
    return None


def visible_text(decode, tokens: Sequence[int], eos_ids: Sequence[int]) -> str:
    """The text of a completion: its tokens without a final eos id."""
    if tokens and tokens[-1] in set(eos_ids):
        tokens = tokens[:-1]
    return decode(list(tokens))
