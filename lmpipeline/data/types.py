"""The data layer's shared vocabulary: where a row came from, what it means, what it tokenises to.

Readers yield (Source, dict) pairs; formats turn each dict into one of the example types below;
masking turns an example into a TokenizedExample (input_ids + labels, -100 where not trained).
Every type carries its Source so that any later error can name file:line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

IGNORE_INDEX = -100

# A chat message in the canonical shape every template understands:
# {"role": "system"|"user"|"assistant"|"tool", "content": str, ...optional "tool_calls"/"name"}.
Message = dict[str, Any]



def stage_for_rows(example) -> str:
    """Which kind of stage trains rows like `example`: for messages that send a user's data where it belongs."""
    kind = type(example).__name__
    if kind == "KTOExample":
        return "a kto stage (completions labelled desirable or undesirable, unpaired)"
    if kind == "PreferenceExample":
        return "a preference stage (dpo, orpo or rm: a prompt with chosen and rejected replies)"
    return "an sft stage (conversations, instructions, prompt/completion or plain text)"


@dataclass(frozen=True)
class Source:
    """Where a row lives: file plus 1-based line (line-oriented files) or 0-based row index."""

    file: str
    row: int
    line: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return f"{self.file}[row {self.row}]"


class DataError(ValueError):
    """A single row is unusable. `reason` is for people; `source` says where."""

    def __init__(self, reason: str, source: Source | None = None, key: str | None = None):
        self.reason = reason
        self.source = source
        self.key = key
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{reason}")


@dataclass
class ChatExample:
    """A conversation; alpaca, instruction/response, sharegpt and messages rows all become this."""

    messages: list[Message]
    source: Source | None = None
    tools: list[dict] | None = None


@dataclass
class TextExample:
    """Plain text: every token is trained (continued pre-training, `dataset_text_field`)."""

    text: str
    source: Source | None = None


@dataclass
class CompletionExample:
    """Non-chat prompt/completion strings, concatenated; completion_only_loss masks the prompt."""

    prompt: str
    completion: str
    source: Source | None = None


@dataclass
class PreferenceExample:
    """A preference pair: shared prompt turns, then the chosen and rejected continuations."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: Source | None = None
    tools: list[dict] | None = None
    score_chosen: float | None = None
    score_rejected: float | None = None


@dataclass
class KTOExample:
    """Unpaired preference: a prompt, one completion and whether it is desirable."""

    prompt: list[Message]
    completion: list[Message]
    label: bool
    source: Source | None = None


Example = Union[ChatExample, TextExample, CompletionExample, PreferenceExample, KTOExample]


@dataclass
class TokenizedExample:
    """What the model trains on. labels[i] == IGNORE_INDEX means token i is not a target."""

    input_ids: list[int]
    labels: list[int]
    source: Source | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenizedPair:
    """A tokenised preference pair: the prompt once, then each completion (completion tokens only)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: Source | None = None
    # score_chosen - score_rejected when the row has both scores (a reward model's optional margin).
    margin: float | None = None


@dataclass
class DataReport:
    """What happened to the rows: counts by outcome, and every problem with its source."""

    total_rows: int = 0
    kept: int = 0
    issues: list[DataError] = field(default_factory=list)
    skipped_invalid: int = 0
    truncated: int = 0
    dropped_overlong: int = 0

    def summary(self) -> str:
        return (
            f"{self.total_rows} rows read, {self.kept} kept, {self.skipped_invalid} invalid skipped, "
            f"{self.truncated} truncated, {self.dropped_overlong} over-long dropped"
        )
