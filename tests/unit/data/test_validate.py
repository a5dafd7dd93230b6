"""validate: every problem reported with file:line, counted, and on_invalid applied."""

from pathlib import Path

import pytest

from lmpipeline.data.readers import read_rows
from lmpipeline.data.types import ChatExample, DataError, DataReport, Source
from lmpipeline.data.validate import InvalidDataError, ValidationReport, format_report, validate_rows

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
CORRUPT = FIXTURES / "corrupt_alpaca.jsonl"


def test_corrupt_jsonl_skip_reports_every_line():
    examples, report = validate_rows(read_rows(CORRUPT), "auto", on_invalid="skip")
    assert report.format == "alpaca" and report.detected
    assert [e.messages[1]["content"] for e in examples] == ["Hello!", "Apple."]
    assert (report.total_rows, report.kept, report.skipped_invalid) == (8, 2, 6)
    assert [i.source.line for i in report.issues] == [2, 4, 5, 6, 7, 8]
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"{CORRUPT}:2: not valid JSON")
    assert lines[1] == f"{CORRUPT}:4: 'instruction' must be a string, found a number (42)"
    assert lines[2].startswith(f"{CORRUPT}:5: invalid UTF-8 (byte 0xe9")
    assert lines[3] == f"{CORRUPT}:6: 'output' is empty"
    assert lines[4].startswith(f"{CORRUPT}:7: missing field 'instruction'") and "'instrution'" in lines[4]
    assert lines[5] == f"{CORRUPT}:8: expected a JSON object, found an array"
    assert lines[6] == report.summary()
    assert lines[6].startswith("8 rows read, 2 kept, 6 invalid skipped")
    assert "Traceback" not in text


def test_corrupt_jsonl_error_mode_raises_once_with_the_whole_report():
    with pytest.raises(InvalidDataError) as err:
        validate_rows(read_rows(CORRUPT), "alpaca")
    e = err.value
    assert isinstance(e, DataError)
    assert e.report.invalid == 6 and len(e.report.issues) == 6
    message = str(e)
    assert f"{CORRUPT}:2:" in message and f"{CORRUPT}:8:" in message
    assert "6 of 8 rows are invalid" in message and "on_invalid: skip" in message
    assert "8 rows read, 2 kept, 6 invalid," in message


def test_corrupt_messages_reasons():
    _, report = validate_rows(read_rows(FIXTURES / "corrupt_messages.jsonl"), on_invalid="skip")
    by_line = {i.source.line: i.reason for i in report.issues}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "starts with an assistant turn" in by_line[2]
    assert "turn 2 (assistant) is empty" in by_line[3]
    assert "unknown role 'robot'" in by_line[4]
    assert "both user turns" in by_line[5]
    assert "content must be a string" in by_line[6]
    assert "part of type 'image'" in by_line[7]
    assert report.kept == 1


def test_ties_are_counted_not_invalid():
    examples, report = validate_rows(read_rows(FIXTURES / "ultrafeedback.jsonl"))  # on_invalid=error
    assert len(examples) == 2 and report.invalid == 0
    assert report.skipped == {"ultrafeedback tie": 1}
    assert "1 ultrafeedback tie" in report.summary()
    assert report.total_rows == 3


def test_options_reach_the_converter(shared_data):
    rows = read_rows(shared_data / "sft_messages" / "llamafactory_reason_tool_use_demo_50.jsonl")
    examples, _ = validate_rows(rows, "messages", reasoning="drop")
    assert not any("reasoning_content" in m for e in examples for m in e.messages)
    rows = [(Source("x", 0, 1), {"body": "hello"})]
    examples, report = validate_rows(rows, text_field="body")
    assert examples[0].text == "hello" and report.format == "text"


def test_real_alpaca_all_kept_and_sources_kept(shared_data):
    path = shared_data / "sft_alpaca" / "llamafactory_alpaca_en_demo.json"
    examples, report = validate_rows(read_rows(path), "alpaca")
    assert report.kept == report.total_rows == 999 and not report.issues
    assert all(isinstance(e, ChatExample) for e in examples)
    assert examples[-1].source.row == 998


def test_unreadable_head_is_reported_not_guessed(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\n")
    with pytest.raises(DataError, match="none of the first 3 rows could be read.*binary.jsonl:1"):
        validate_rows(read_rows(path))


def test_all_invalid_with_skip_returns_empty_for_the_caller_to_judge():
    rows = [(Source("f.jsonl", 0, 1), {"instruction": "a", "output": ""})]
    examples, report = validate_rows(rows, "alpaca", on_invalid="skip")
    assert examples == [] and report.skipped_invalid == 1


def test_column_mapping_with_auto_detection():
    rows = [(Source("f.csv", i, i + 2), {"question": f"q{i}", "answer": f"a{i}"}) for i in range(3)]
    examples, report = validate_rows(rows, "auto", column_mapping={"instruction": "question", "output": "answer"})
    assert report.format == "alpaca" and examples[2].messages[1]["content"] == "a2"


def test_undetectable_format_names_the_file(shared_data):
    path = shared_data / "eval_prompts" / "fastchat_mt_bench_question.jsonl"
    with pytest.raises(DataError) as err:
        validate_rows(read_rows(path))
    assert str(err.value).startswith(f"{path}: could not detect the data format")
    assert "turns" in str(err.value)


def test_bad_on_invalid_and_unknown_format():
    with pytest.raises(DataError, match="on_invalid"):
        validate_rows([], "alpaca", on_invalid="ignore")
    with pytest.raises(DataError, match="unknown data format"):
        validate_rows([], "alpacka")


def test_unexpected_converter_failure_is_a_row_issue(monkeypatch):
    import lmpipeline.data.validate as validate

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(validate, "convert_row", boom)
    rows = [(Source("f.jsonl", 0, 1), {"text": "x"}), (Source("f.jsonl", 1, 2), {"text": "y"})]
    examples, report = validate_rows(rows, "text", on_invalid="skip")
    assert not examples and "KeyError" in report.issues[0].reason


def test_format_report_truncates():
    report = ValidationReport(total_rows=5, invalid=5)
    report.issues = [DataError(f"bad {i}", Source("f.jsonl", i, i + 1)) for i in range(5)]
    text = format_report(report, max_issues=2)
    assert text.splitlines() == ["f.jsonl:1: bad 0", "f.jsonl:2: bad 1", "... and 3 more", report.summary()]
    plain = DataReport(total_rows=1, issues=[DataError("no source")])
    assert format_report(plain).splitlines()[0] == "no source"
