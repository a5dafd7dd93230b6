"""Errors meant for people. The CLI prints these without a traceback and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a path, a setting, the hardware. Say what, where, and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None, hint: str | None = None):
        self.key = key
        self.where = where
        self.hint = hint
        parts = []
        if where:
            parts.append(f"{where}: ")
        if key:
            parts.append(f"{key}: ")
        parts.append(message)
        if hint:
            parts.append(f"\n  -> {hint}")
        super().__init__("".join(parts))


class OutputExistsError(UserError):
    """The output folder holds a previous run; we never overwrite it without being told."""


class NonFiniteLossError(UserError):
    """Training produced NaN/inf; the run stops rather than train on garbage."""

    exit_code = 3
