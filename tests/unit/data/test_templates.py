"""templates: built-ins render exactly like the real templates; resolution order; end of turn."""

from __future__ import annotations

import json

import pytest

from lmpipeline.data.templates import (
    BUILTIN_NAMES,
    builtin_name_of,
    builtin_template,
    end_of_turn_token,
    load_template_file,
    resolve_chat_template,
)
from lmpipeline.data.types import DataError

# One loader for the session: test_masking caches each real tokenizer (llama3.2-base takes ~3 s).
from tests.unit.data.test_masking import CONV, load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"name": "get_weather", "arguments": {"city": "Rome"}}]},
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "tool", "content": '{"celsius": 25}'},
    {"role": "assistant", "content": "Paris 21 C, Rome 25 C."},
    {"role": "user", "content": "Thanks"},
]


def chujiezheng(shared_data, name):
    # Pretty-printed by their author; the stripping their README prescribes gives the real template.
    text = (shared_data / "chat_templates" / "chujiezheng" / name).read_text()
    return text.replace("    ", "").replace("\n", "")


# (built-in, tokenizer folder, reference: "own" = the tokenizer's template, else a chujiezheng file)
REFERENCES = [
    ("qwen2.5", "qwen2.5-0.5b-instruct", "own"),
    ("phi-3", "phi-3-mini", "own"),
    ("llama-3", "llama3.2-base", "llama-3-instruct.jinja"),
    ("llama-2", "llama2", "llama-2-chat.jinja"),
    ("mistral", "mistral-7b-v0.1", "mistral-instruct.jinja"),
    ("chatml", "qwen2.5-0.5b-instruct", "chatml.jinja"),
    ("chatml", "gpt2", "chatml.jinja"),
    ("alpaca", "gpt2", "alpaca.jinja"),
    ("alpaca", "llama3.2-base", "alpaca.jinja"),
]


@pytest.mark.parametrize("name,folder,ref", REFERENCES, ids=[f"{n}-{f}" for n, f, _ in REFERENCES])
def test_builtin_renders_like_the_real_template(shared_data, name, folder, ref):
    tokenizer = load_tokenizer(shared_data, folder)
    reference = tokenizer.chat_template if ref == "own" else chujiezheng(shared_data, ref)
    ours = builtin_template(name)
    cases = [
        (CONV, False),  # system + two exchanges
        (CONV[1:], False),  # no system message
        (CONV[:4], True),  # a prompt with the generation prompt
        (CONV[1:2], True),
    ]
    for messages, gen in cases:
        want = tokenizer.apply_chat_template(messages, chat_template=reference, add_generation_prompt=gen,
                                             tokenize=False)
        got = tokenizer.apply_chat_template(messages, chat_template=ours, add_generation_prompt=gen, tokenize=False)
        assert got == want, (messages, gen)


def test_qwen_tools_render_like_the_real_template(shared_data):
    tokenizer = load_tokenizer(shared_data, "qwen2.5-0.5b-instruct")
    for messages in (TOOL_CONV, [{"role": "system", "content": "Be exact."}] + TOOL_CONV):
        for gen in (False, True):
            kw = dict(tools=TOOLS, add_generation_prompt=gen, tokenize=False)
            want = tokenizer.apply_chat_template(messages, **kw)
            got = tokenizer.apply_chat_template(messages, chat_template=builtin_template("qwen2.5"), **kw)
            assert got == want
    no_system = tokenizer.apply_chat_template(CONV[1:], chat_template=builtin_template("qwen2.5"), tokenize=False)
    assert no_system.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_alpaca_format(shared_data):
    tokenizer = load_tokenizer(shared_data, "gpt2")
    text = tokenizer.apply_chat_template(CONV[:3], chat_template=builtin_template("alpaca"), tokenize=False)
    assert text == (f"<|endoftext|>{CONV[0]['content']}\n\n### Instruction:\n{CONV[1]['content']}\n\n"
                    f"### Response:\n{CONV[2]['content']}<|endoftext|>\n\n")


def test_builtins_are_known_by_name_and_text():
    for name in BUILTIN_NAMES:
        text = builtin_template(name)
        assert builtin_name_of(text) == name and builtin_name_of(name) == name
    assert builtin_template("Llama3") == builtin_template("llama-3")  # alias, case-insensitive
    with pytest.raises(DataError, match="built-in templates are: chatml"):
        builtin_template("vicuna")


def test_end_of_turn_tokens(shared_data):
    llama2 = load_tokenizer(shared_data, "llama2")
    gpt2 = load_tokenizer(shared_data, "gpt2")
    assert end_of_turn_token("chatml", gpt2) == "<|im_end|>"
    assert end_of_turn_token(builtin_template("qwen2.5"), gpt2) == "<|im_end|>"
    assert end_of_turn_token("llama-3", gpt2) == "<|eot_id|>"
    assert end_of_turn_token("phi-3", gpt2) == "<|end|>"
    assert end_of_turn_token("llama-2", llama2) == "</s>"
    assert end_of_turn_token("mistral", llama2) == "</s>"
    assert end_of_turn_token("alpaca", gpt2) == "<|endoftext|>"
    # real templates that are not built-ins
    qwen = load_tokenizer(shared_data, "qwen2.5-0.5b-instruct")
    phi3 = load_tokenizer(shared_data, "phi-3-mini")
    assert end_of_turn_token(qwen.chat_template, qwen) == "<|im_end|>"
    assert end_of_turn_token(phi3.chat_template, phi3) == "<|end|>"
    configs = shared_data / "chat_templates" / "tokenizer_configs"
    assert end_of_turn_token(load_template_file(configs / "gemma-3"), gpt2) == "<end_of_turn>"
    assert end_of_turn_token(load_template_file(configs / "smollm3" / "chat_template.jinja"), gpt2) == "<|im_end|>"
    assert end_of_turn_token("{{ messages[0]['content'] }}", gpt2) is None


# --- resolution -------------------------------------------------------------------------------


def test_resolution_order(shared_data, tmp_path):
    qwen = load_tokenizer(shared_data, "qwen2.5-0.5b-instruct")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ 'from file' }}")
    # path beats name, name beats the tokenizer's own
    assert resolve_chat_template(qwen, chat_template_path=jinja, chat_template="chatml") == "{{ 'from file' }}"
    assert resolve_chat_template(qwen, chat_template="chatml") == builtin_template("chatml")
    assert resolve_chat_template(qwen, chat_template="{{ 'literal' }}") == "{{ 'literal' }}"
    assert resolve_chat_template(qwen) == qwen.chat_template


def test_template_files(shared_data, tmp_path):
    configs = shared_data / "chat_templates" / "tokenizer_configs"
    phi4 = json.loads((configs / "phi-4-mini" / "tokenizer_config.json").read_text())["chat_template"]
    assert load_template_file(configs / "phi-4-mini" / "tokenizer_config.json") == phi4
    gemma = json.loads((configs / "gemma-3" / "chat_template.json").read_text())["chat_template"]
    assert load_template_file(configs / "gemma-3" / "chat_template.json") == gemma
    assert load_template_file(configs / "gemma-3") == gemma  # a folder
    smol = (configs / "smollm3" / "chat_template.jinja").read_text()
    assert load_template_file(configs / "smollm3") == smol  # chat_template.jinja wins in a folder
    # the multi-template list form picks "default"
    named = tmp_path / "tokenizer_config.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                   {"name": "default", "template": "D"}]}))
    assert load_template_file(named) == "D"


def test_resolution_errors(shared_data, tmp_path):
    gpt2 = load_tokenizer(shared_data, "gpt2")
    missing = tmp_path / "nope.jinja"
    with pytest.raises(DataError, match="nope.jinja"):
        resolve_chat_template(gpt2, chat_template_path=missing)
    with pytest.raises(DataError) as info:
        resolve_chat_template(gpt2)
    assert "no chat template" in str(info.value)
    assert all(name in str(info.value) for name in BUILTIN_NAMES)
    no_entry = tmp_path / "tokenizer_config.json"
    no_entry.write_text("{}")
    with pytest.raises(DataError, match="no 'chat_template'"):
        load_template_file(no_entry)
