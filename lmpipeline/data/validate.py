"""Convert every row of a dataset, collect every problem with its file:line, and count outcomes.

`validate_rows(rows, fmt)` takes what `readers.read_rows` yields — `(Source, dict | DataError)`
pairs — detects the format from the first rows when `fmt` is "auto" (or None), converts each row
with `formats.convert_row`, and returns `(examples, report)`.

on_invalid:
  - "error" (default): every row is still converted so that all problems are known; then, if any
    row was invalid, `InvalidDataError` is raised carrying the whole report. Its message lists the
    first issues as "file:line: reason" and the summary, so one run shows every problem.
  - "skip": invalid rows are dropped and counted (report.skipped_invalid).
Rows the converter leaves out on purpose (`formats.RowSkipped`: UltraFeedback ties, identical
chosen/rejected) are never invalid: they are counted by category in report.skipped under either
policy. With "skip", a dataset whose rows are all invalid comes back as an empty list: the caller
decides how fatal that is and names its config key.

Over-long rows are not handled here: tokenisation counts them later into report.truncated /
report.dropped_overlong of the same report type.

Raised: DataError when the format cannot be detected or is unknown, or on_invalid is not one of
error/skip; InvalidDataError (a DataError, with `.report`) as above. A converter failing with an unexpected TypeError/ValueError/KeyError/AttributeError on a
strange row is recorded as that row's issue rather than aborting, so one odd record cannot crash a
long preprocessing run; the message names the exception so the bug stays visible.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lmpipeline.data.formats import DETECT_SAMPLE, RowSkipped, canonical_format, convert_row, detect_format
from lmpipeline.data.types import DataError, DataReport, Example, Source

ON_INVALID = ("error", "skip")
# Enough to show and diagnose every kind of problem without holding millions of errors in memory.
MAX_STORED_ISSUES = 1000


@dataclass
class ValidationReport(DataReport):
    """DataReport plus what validation alone knows: the format used and rows skipped on purpose.

    `invalid` counts every invalid row, including those beyond the MAX_STORED_ISSUES kept in
    `issues`.
    """

    format: str | None = None
    detected: bool = False
    invalid: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        # Under on_invalid=error nothing is skipped, so say "invalid", not "0 invalid skipped".
        invalid = f"{self.skipped_invalid} invalid skipped" if self.skipped_invalid or not self.invalid else f"{self.invalid} invalid"
        text = (
            f"{self.total_rows} rows read, {self.kept} kept, {invalid}, "
            f"{self.truncated} truncated, {self.dropped_overlong} over-long dropped"
        )
        if self.skipped:
            text += "; left out on purpose: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        if self.format:
            text += f" (format {self.format}{', detected' if self.detected else ''})"
        return text


class InvalidDataError(DataError):
    """Some rows are invalid and on_invalid is "error". Carries the whole `report`."""

    def __init__(self, report: DataReport, *, hint: str | None = None, max_issues: int = 20):
        self.report = report
        message = format_report(report, max_issues=max_issues)
        if hint:
            message += f"\n{hint}"
        super().__init__(message)


def validate_rows(
    rows: Iterable[tuple[Source, dict | DataError]],
    fmt: str | None = "auto",
    *,
    on_invalid: str = "error",
    text_field: str = "text",
    **convert_options: Any,
) -> tuple[list[Example], ValidationReport]:
    """Convert all rows; see the module docstring. `convert_options` go to `convert_row`."""
    if on_invalid not in ON_INVALID:
        raise DataError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got '{on_invalid}'")
    rows = iter(rows)
    report = ValidationReport()
    if fmt is None or str(fmt).lower() == "auto":
        head = list(itertools.islice(rows, DETECT_SAMPLE))
        records = [row for _, row in head if isinstance(row, dict)]
        if head and not records:
            source, first = head[0]
            raise DataError(
                f"{source.file}: none of the first {len(head)} rows could be read, so the format "
                f"cannot be detected; first problem: {first}"
            )
        try:
            name = detect_format(records, text_field=text_field, column_mapping=convert_options.get("column_mapping"))
        except DataError as e:
            where = f"{head[0][0].file}: " if head else ""
            raise DataError(f"{where}{e.reason}") from None
        report.detected = True
        rows = itertools.chain(head, rows)
    else:
        name = canonical_format(fmt)
    report.format = name

    examples: list[Example] = []
    for source, row in rows:
        report.total_rows += 1
        if isinstance(row, DataError):
            _record(report, row, source)
            continue
        try:
            examples.append(convert_row(row, name, source, text_field=text_field, **convert_options))
        except RowSkipped as e:
            report.skipped[e.category] = report.skipped.get(e.category, 0) + 1
        except DataError as e:
            _record(report, e, source)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            _record(report, DataError(f"could not convert row ({type(e).__name__}: {e})", source), source)
    report.kept = len(examples)

    if on_invalid == "skip":
        report.skipped_invalid = report.invalid
    if report.invalid and on_invalid == "error":
        raise InvalidDataError(
            report,
            hint=f"{report.invalid} of {report.total_rows} rows are invalid. Fix them, or set "
            "on_invalid: skip to drop them.",
        )
    return examples, report


def _record(report: ValidationReport, error: DataError, source: Source) -> None:
    report.invalid += 1
    if error.source is None:
        error = DataError(error.reason, source, error.key)
    if len(report.issues) < MAX_STORED_ISSUES:
        report.issues.append(error)


def format_report(report: DataReport, max_issues: int = 50) -> str:
    """One "file:line: reason" line per issue (the first `max_issues`), then the summary."""
    lines = []
    for issue in report.issues[:max_issues]:
        lines.append(f"{issue.source}: {issue.reason}" if issue.source else issue.reason)
    total = getattr(report, "invalid", len(report.issues)) or len(report.issues)
    if total > min(len(report.issues), max_issues):
        lines.append(f"... and {total - min(len(report.issues), max_issues)} more")
    lines.append(report.summary())
    return "\n".join(lines)
