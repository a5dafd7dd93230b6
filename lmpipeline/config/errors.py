"""Config errors that name the key, the file and the line, all at once."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass
class ConfigIssue:
    path: str  # dotted key path, e.g. "stage_configs.sft.lora_r"
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(ValueError):
    """One or more problems with a config; str() lists every one of them."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        n = len(issues)
        head = f"{n} problem{'s' if n != 1 else ''} in the config:"
        super().__init__("\n".join([head] + [f"  - {i}" for i in issues]))


def did_you_mean(word: str, choices) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
