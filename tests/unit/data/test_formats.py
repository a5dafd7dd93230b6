"""formats: detection and conversion of every supported format, on real files where they exist."""

import json
import re
from pathlib import Path

import pytest

from lmpipeline.data.formats import (
    RowSkipped,
    canonical_format,
    convert_row,
    detect_format,
    format_kind,
)
from lmpipeline.data.readers import read_rows
from lmpipeline.data.types import (
    ChatExample,
    CompletionExample,
    DataError,
    KTOExample,
    PreferenceExample,
    Source,
    TextExample,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
SRC = Source("test.jsonl", 0, 1)

# (path, shared?, detected format, example type, rows)
CASES = [
    ("sft_alpaca/llamafactory_alpaca_en_demo.json", True, "alpaca", ChatExample, 999),
    ("sft_alpaca/llamafactory_identity.json", True, "alpaca", ChatExample, 91),
    ("sft_sharegpt/llamafactory_glaive_toolcall_en_demo.json", True, "sharegpt", ChatExample, 300),
    ("sft_messages/llamafactory_v1_sft_demo.jsonl", True, "messages", ChatExample, 500),
    ("sft_messages/llamafactory_reason_tool_use_demo_50.jsonl", True, "messages", ChatExample, 50),
    ("preference/llamafactory_dpo_en_demo.json", True, "sharegpt_preference", PreferenceExample, 300),
    ("preference/llamafactory_v1_dpo_demo.jsonl", True, "preference_messages", PreferenceExample, 10),
    ("kto/llamafactory_kto_en_demo.json", True, "kto", KTOExample, 300),
    ("pretrain_text/llamafactory_c4_demo.jsonl", True, "text", TextExample, 300),
    ("pretrain_text/llamafactory_wiki_demo.txt", True, "text", TextExample, 30),
    ("instruction_context_response.jsonl", False, "instruction_context_response", ChatExample, 3),
    ("instruction_response.jsonl", False, "instruction_response", ChatExample, 3),
    ("prompt_completion.jsonl", False, "prompt_completion", CompletionExample, 3),
    ("alpaca.csv", False, "alpaca", ChatExample, 3),
    ("preference.jsonl", False, "preference", PreferenceExample, 4),
    ("hh_rlhf.jsonl", False, "hh_rlhf", PreferenceExample, 2),
    ("ultrafeedback.jsonl", False, "ultrafeedback", PreferenceExample, 2),  # + 1 tie skipped
    ("ultrafeedback_binarized.jsonl", False, "ultrafeedback_binarized", PreferenceExample, 2),
    ("kto_prompt_completion.jsonl", False, "kto", KTOExample, 3),
]


def load(path, shared_data=None):
    base = shared_data if shared_data is not None else FIXTURES
    pairs = list(read_rows(base / path))
    assert not [r for _, r in pairs if isinstance(r, DataError)]
    return pairs


@pytest.mark.parametrize("path,shared,fmt,kind,count", CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_detect_and_convert_every_format(request, path, shared, fmt, kind, count):
    base = request.getfixturevalue("shared_data") if shared else FIXTURES
    pairs = list(read_rows(base / path))
    rows = [r for _, r in pairs]
    assert detect_format(rows) == fmt
    examples = []
    for source, row in pairs:
        try:
            examples.append(convert_row(row, fmt, source))
        except RowSkipped:
            pass
    assert len(examples) == count
    assert all(isinstance(e, kind) for e in examples)
    assert all(e.source is not None for e in examples)
    if kind is ChatExample:
        assert all(any(m["role"] == "assistant" for m in e.messages) for e in examples)
        assert all(isinstance(m["content"], str) for e in examples for m in e.messages)


# --- SFT -------------------------------------------------------------------------------------


def test_alpaca_input_joined_after_blank_line_and_system_history():
    ex = convert_row({"instruction": "Classify.", "input": "oak, cat", "output": "plant, animal"}, "alpaca", SRC)
    assert ex.messages == [
        {"role": "user", "content": "Classify.\n\noak, cat"},
        {"role": "assistant", "content": "plant, animal"},
    ]
    ex = convert_row(
        {"instruction": "And 3+3?", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"]]},
        "alpaca",
        SRC,
    )
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    ex = convert_row({"instruction": "", "input": "only input", "output": "ok"}, "alpaca", SRC)
    assert ex.messages[0]["content"] == "only input"


def test_instruction_context_response_uses_context(shared_data):
    pairs = load("instruction_context_response.jsonl")
    first = convert_row(pairs[0][1], "instruction_context_response", pairs[0][0])
    assert first.messages[0]["content"].startswith("When was the Eiffel Tower completed?\n\nThe Eiffel Tower")
    second = convert_row(pairs[1][1], "instruction_context_response", pairs[1][0])
    assert second.messages[0]["content"] == "Give three uses for a paperclip."  # empty context


def test_glaive_function_call_and_tools(shared_data):
    pairs = load("sft_sharegpt/llamafactory_glaive_toolcall_en_demo.json", shared_data)
    ex = convert_row(pairs[0][1], "sharegpt", pairs[0][0])
    call = next(m for m in ex.messages if m.get("tool_calls"))
    assert call["role"] == "assistant"
    assert json.loads(call["content"])["name"] == "search_recipes"
    assert call["tool_calls"] == [
        {"type": "function", "function": {"name": "search_recipes",
                                          "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}
    ]
    i = ex.messages.index(call)
    assert ex.messages[i + 1]["role"] == "tool"
    assert isinstance(ex.tools, list) and ex.tools[0]["name"] == "search_recipes"
    # rows whose tools string is "[]" or "" carry no tools
    no_tools = [convert_row(r, "sharegpt", s) for s, r in pairs if r["tools"] in ("", "[]")]
    assert no_tools and all(e.tools is None for e in no_tools)


def test_v1_typed_content_and_loss_weight(shared_data):
    pairs = load("sft_messages/llamafactory_v1_sft_demo.jsonl", shared_data)
    ex = convert_row(pairs[0][1], "messages", pairs[0][0])
    assert ex.messages[0] == {"role": "user", "content": "hi", "loss_weight": 0.0}
    assert ex.messages[1]["content"].startswith("Hello! I am {{name}}")
    assert ex.messages[1]["loss_weight"] == 1.0


@pytest.mark.parametrize("mode", ["field", "drop", "inline"])
def test_reasoning_and_tool_call_parts(shared_data, mode):
    pairs = load("sft_messages/llamafactory_reason_tool_use_demo_50.jsonl", shared_data)
    raw = pairs[1][1]
    ex = convert_row(raw, "messages", pairs[1][0], reasoning=mode)
    assert [m["role"] for m in ex.messages][:5] == ["system", "user", "assistant", "tool", "assistant"]
    call_turn, answer = ex.messages[2], ex.messages[4]
    assert call_turn["tool_calls"][0]["function"] == {"name": "get_movie_details", "arguments": {"title": "Inception"}}
    reasoning = raw["messages"][4]["content"][0]["value"]
    visible = raw["messages"][4]["content"][1]["value"]
    if mode == "field":
        assert answer["content"] == visible and answer["reasoning_content"] == reasoning
    elif mode == "drop":
        assert answer["content"] == visible and "reasoning_content" not in answer
    else:
        assert answer["content"] == f"<think>\n{reasoning}\n</think>\n\n{visible}"
    assert ex.tools[0]["function"]["name"] == "get_movie_details"


def test_parallel_tool_calls(shared_data):
    pairs = load("sft_messages/llamafactory_reason_tool_use_demo_50.jsonl", shared_data)
    multi = [
        convert_row(r, "messages", s) for s, r in pairs
        if any(sum(p["type"] == "tool_call" for p in m["content"]) > 1 for m in r["messages"])
    ]
    assert multi
    turn = next(m for m in multi[0].messages if len(m.get("tool_calls", [])) > 1)
    assert len(turn["content"].split("\n")) == len(turn["tool_calls"])


def test_openai_tool_calls_passthrough_and_string_arguments():
    row = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5 C"},
        {"role": "assistant", "content": "It is 5 C in Oslo."},
    ], "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
    ex = convert_row(row, "chatml", SRC)
    call = ex.messages[1]
    assert call["tool_calls"] == [{"type": "function", "id": "c1",
                                   "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert ex.messages[2]["tool_call_id"] == "c1"


def test_dpo_demo_system_turns(shared_data):
    pairs = load("preference/llamafactory_dpo_en_demo.json", shared_data)
    examples = [convert_row(r, "sharegpt_preference", s) for s, r in pairs]
    with_system = [e for e in examples if e.prompt[0]["role"] == "system"]
    assert len(with_system) == 80
    assert all(e.prompt[-1]["role"] == "user" for e in examples)
    assert all(len(e.chosen) == 1 and e.chosen[0]["role"] == "assistant" for e in examples)


def test_v1_dpo_shared_prefix(shared_data):
    pairs = load("preference/llamafactory_v1_dpo_demo.jsonl", shared_data)
    ex = convert_row(pairs[0][1], "preference_messages", pairs[0][0])
    assert [m["role"] for m in ex.prompt] == ["system", "user"]
    assert ex.chosen[0]["content"].startswith("Abdulah Hasanagic is the proud owner")
    assert ex.rejected[0]["content"].startswith(" Abdulah Hasanagic")


def test_kto_messages_split_last_turn(shared_data):
    pairs = load("kto/llamafactory_kto_en_demo.json", shared_data)
    examples = [convert_row(r, "kto", s) for s, r in pairs]
    assert sum(e.label for e in examples) == 150
    multi = next(e for e in examples if len(e.prompt) > 1)
    assert multi.prompt[-1]["role"] == "user" and multi.completion[0]["role"] == "assistant"


def test_text_field_option(shared_data):
    ex = convert_row({"body": "hello"}, "text", SRC, text_field="body")
    assert ex == TextExample("hello", SRC)
    assert canonical_format("custom") == "text"


def test_prompt_completion_strings_and_lists():
    assert convert_row({"prompt": "a", "completion": "b"}, "prompt_completion", SRC) == CompletionExample("a", "b", SRC)
    ex = convert_row(
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
        "prompt_completion",
        SRC,
    )
    assert isinstance(ex, ChatExample) and [m["role"] for m in ex.messages] == ["user", "assistant"]


# --- preference --------------------------------------------------------------------------------


def test_preference_variants():
    pairs = load("preference.jsonl")
    ex = [convert_row(r, "preference", s) for s, r in pairs]
    assert ex[0].prompt == [{"role": "user", "content": "How do I learn Python?"}]
    assert ex[0].chosen == [{"role": "assistant", "content": "Start with the official tutorial, then build small projects."}]
    assert ex[1].prompt == [{"role": "user", "content": "What is 2 + 2?"}]  # "Human: ... Assistant:" parsed
    assert ex[2].rejected == [{"role": "assistant", "content": "8"}]
    assert ex[3].prompt == [{"role": "user", "content": "Is water wet?"}]
    assert ex[3].rejected == [{"role": "assistant", "content": "No."}]


def test_hh_rlhf_multi_turn_prefix():
    pairs = load("hh_rlhf.jsonl")
    ex = convert_row(pairs[1][1], "hh_rlhf", pairs[1][0])
    assert [m["role"] for m in ex.prompt] == ["user", "assistant", "user"]
    assert ex.prompt[2]["content"] == "Yes, dry yeast."
    assert ex.chosen[0]["content"].startswith("Great. Mix 500 g flour")
    assert ex.rejected == [{"role": "assistant", "content": "Buy bread instead."}]


def test_ultrafeedback_binarisation():
    pairs = load("ultrafeedback.jsonl")
    (s0, r0), (s1, r1), (s2, r2) = pairs
    worst = convert_row(r0, "ultrafeedback", s0, ultrafeedback_rejected="worst")
    assert worst.chosen[0]["content"].startswith("Leaves drift") and worst.score_chosen == 4.75
    assert worst.rejected[0]["content"] == "Autumn is a season." and worst.score_rejected == 1.5
    picks = {convert_row(r0, "ultrafeedback", s0, seed=seed).rejected[0]["content"] for seed in range(20)}
    assert len(picks) == 3 and not any(p.startswith("Leaves drift") for p in picks)
    assert convert_row(r0, "ultrafeedback", s0, seed=3) == convert_row(r0, "ultrafeedback", s0, seed=3)
    with pytest.raises(RowSkipped) as tie:
        convert_row(r1, "ultrafeedback", s1)
    assert tie.value.category == "ultrafeedback tie"
    # overall_score breaks that tie
    assert convert_row(r1, "ultrafeedback", s1, ultrafeedback_score="overall_score").score_chosen == 8.0
    # annotations: "N/A" ratings are ignored in the mean
    ann = convert_row(r2, "ultrafeedback", s2, ultrafeedback_score="annotations", ultrafeedback_rejected="worst")
    assert ann.score_chosen == 5.0 and ann.rejected[0]["content"] == "Bonjour."


def test_ultrafeedback_binarized_scores():
    pairs = load("ultrafeedback_binarized.jsonl")
    ex = convert_row(pairs[0][1], "ultrafeedback_binarized", pairs[0][0])
    assert ex.prompt == [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
    assert ex.chosen == [{"role": "assistant", "content": "100 °C (212 °F)."}]
    assert (ex.score_chosen, ex.score_rejected) == (9.0, 2.0)


def test_identical_pair_is_skipped_not_invalid():
    row = {"prompt": "q", "chosen": "same", "rejected": "same"}
    with pytest.raises(RowSkipped):
        convert_row(row, "preference", SRC)


def test_kto_prompt_completion_and_labels():
    pairs = load("kto_prompt_completion.jsonl")
    ex = [convert_row(r, "kto", s) for s, r in pairs]
    assert [e.label for e in ex] == [True, False, True]
    assert ex[1].completion == [{"role": "assistant", "content": "Kyoto."}]
    assert convert_row({"prompt": "q", "completion": "a", "label": "false"}, "kto", SRC).label is False


# --- column mapping, names, detection errors -----------------------------------------------------


def test_column_mapping():
    ex = convert_row({"question": "2+2?", "answer": "4"}, "column_mapping", SRC,
                     column_mapping={"instruction": "question", "output": "answer"})
    assert ex.messages[0]["content"] == "2+2?" and ex.messages[1]["content"] == "4"
    ex = convert_row({"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                     "columns", SRC, column_mapping={"messages": "dialog"})
    assert isinstance(ex, ChatExample)
    ex = convert_row({"q": "x", "good": "y", "bad": "z"}, "column_mapping", SRC,
                     column_mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert isinstance(ex, PreferenceExample)
    with pytest.raises(DataError, match="'answr'.*not in the row.*'answer'"):
        convert_row({"question": "q", "answer": "a"}, "column_mapping", SRC,
                    column_mapping={"instruction": "question", "output": "answr"})


def test_detect_after_column_mapping():
    rows = [{"question": "q", "answer": "a"}, {"question": "q2"}]
    assert detect_format(rows, column_mapping={"instruction": "question", "output": "answer"}) == "alpaca"


def test_aliases_and_unknown_format():
    assert canonical_format("ChatML") == "messages"
    assert canonical_format("conversations") == "sharegpt"
    assert canonical_format("hh-rlhf") == "hh_rlhf"
    assert format_kind("dpo") == "preference" and format_kind("alpaca") == "supervised"
    with pytest.raises(DataError, match="Did you mean 'alpaca'"):
        canonical_format("alpacca")


@pytest.mark.parametrize(
    "rows,expect",
    [
        ([{"instrution": "a", "output": "b"}], "'instrution' looks like 'instruction'"),
        ([{"conversation": [{"from": "human", "value": "hi"}]}], "'conversation' looks like 'conversations'"),
        ([{"foo": 1}], "keys seen in the first 1 rows: foo"),
    ],
)
def test_detect_unknown_lists_keys_and_suggests(rows, expect):
    with pytest.raises(DataError) as err:
        detect_format(rows)
    assert expect in err.value.reason
    assert "\n  alpaca: instruction + output\n" in err.value.reason


def test_detect_mixed_formats_is_ambiguous():
    rows = [{"instruction": "a", "output": "b"}, {"messages": []}]
    with pytest.raises(DataError, match="mix formats"):
        detect_format(rows)


def test_detect_tolerates_one_bad_row():
    rows = [{"instruction": "a", "output": "b"}] * 5 + [{"instrution": "a", "output": "b"}]
    assert detect_format(rows) == "alpaca"


# --- conversion errors -------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "row,fmt,expect",
    [
        ({"instrution": "a", "output": "b"}, "alpaca", "missing field 'instruction'.*has 'instrution'"),
        ({"instruction": "a", "outptu": "b"}, "alpaca", "missing field 'output'.*'outptu'"),
        ({"instruction": ["a"], "output": "b"}, "alpaca", "'instruction' must be a string, found a list"),
        ({"instruction": "a", "output": "  "}, "alpaca", "'output' is empty"),
        ({"messages": "[]"}, "messages", "found a string"),
        ({"messages": [ASSISTANT, USER]}, "messages", "starts with an assistant turn"),
        ({"messages": [USER, USER, ASSISTANT]}, "messages", "turns 1 and 2 are both user turns"),
        ({"messages": [USER, {"role": "assistant", "content": ""}]}, "messages", r"turn 2 \(assistant\) is empty"),
        ({"messages": [USER, {"role": "robot", "content": "x"}]}, "messages", "unknown role 'robot'"),
        ({"messages": [USER, {"role": "asistant", "content": "x"}]}, "messages", "Did you mean 'assistant'"),
        ({"messages": [USER, {"role": "assistant", "content": 3}]}, "messages", "content must be a string or a list"),
        ({"messages": [USER, {"role": "assistant", "contnet": "x"}]}, "messages", "no 'content'.*Found 'contnet': a typo of 'content'"),
        ({"messages": [USER, ASSISTANT, {"role": "system", "content": "s"}]}, "messages", "only the first turn may be system"),
        ({"messages": [USER, {"role": "tool", "content": "r"}, ASSISTANT]}, "messages", "does not follow an assistant"),
        ({"messages": [USER]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, ASSISTANT]},
         "messages", "part of type 'image_url'; only text"),
        ({"messages": [USER, ASSISTANT], "tools": "{not json"}, "messages", "'tools' is not valid JSON"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "sharegpt", "no 'content' \\(or 'value'\\)"),
        ({"chosen": "a", "rejected": "b"}, "preference", "no 'prompt' column"),
        ({"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "other"}, ASSISTANT]},
         "preference", "share no prompt"),
        ({"prompt": [USER, ASSISTANT], "chosen": "a", "rejected": "b"}, "preference", "ends with an assistant turn"),
        ({"chosen": "no markers", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "hh_rlhf", "text before the first 'Human:'"),
        ({"prompt": "q", "completion": "a", "label": "maybe"}, "kto", "'label' must be true/false"),
        ({"messages": [USER], "label": True}, "kto", "must end with the assistant turn"),
        ({"instruction": "q", "completions": "x"}, "ultrafeedback", "'completions' must be a list"),
        ({"txt": "hello"}, "text", "missing text column 'text'.*'txt'"),
    ],
)
def test_convert_errors_are_human(row, fmt, expect):
    with pytest.raises(DataError) as err:
        convert_row(row, fmt, SRC)
    assert not isinstance(err.value, RowSkipped)
    assert err.value.source == SRC
    assert re.search(expect, err.value.reason), err.value.reason
    assert str(err.value).startswith("test.jsonl:1: ")


def test_assistant_turns_in_a_row_are_allowed():
    ex = convert_row({"messages": [USER, ASSISTANT, {"role": "assistant", "content": "more"}]}, "messages", SRC)
    assert len(ex.messages) == 3


def test_bad_option_values():
    with pytest.raises(DataError, match="reasoning"):
        convert_row({"text": "x"}, "text", SRC, reasoning="keep")
    with pytest.raises(DataError, match="column_mapping option"):
        convert_row({"text": "x"}, "column_mapping", SRC)


def test_arrow_null_filled_fields(tmp_path):
    """Parquet/datasets give every struct all schema fields, with None where a message had none."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "ok"}, ASSISTANT]},
        {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    pairs = list(read_rows(path))
    assert pairs[1][1]["messages"][0]["role"] is None  # Arrow filled the absent field
    assert detect_format([r for _, r in pairs]) == "messages"
    first, second = (convert_row(r, "messages", s) for s, r in pairs)
    assert first.messages[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}
    assert "tool_calls" not in first.messages[0] and "loss_weight" not in first.messages[0]
    assert second.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
