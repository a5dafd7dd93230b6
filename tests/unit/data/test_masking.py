"""masking: exact trained token ids per built-in template and real tokenizer, built independently.

The expected ids are never produced by the code under test: each case spells the format out by
hand as pieces (text, trained) and tokenises every piece on its own. Pieces are cut only where no
token can straddle the cut: at special tokens, and at a newline before text (every BPE
pre-tokeniser here splits "\\n" from letters and digits; SentencePiece has no merges across it).

SentencePiece tokenizers (llama2, phi-3) add a dummy-prefix "▁" at the start of a string, but not
right after a special token. A piece that follows a special token in the conversation is
therefore tokenised *after* that token (its `after` context), whose ids are dropped again. A
special token is atomic, so this cannot merge anything across the cut.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from lmpipeline.data.masking import (
    apply_overlong,
    check_trained_tokens,
    render_tokens,
    token_table,
    tokenize_chat,
    tokenize_completion,
    tokenize_preference,
    tokenize_text,
)
from lmpipeline.data.templates import builtin_template
from lmpipeline.data.types import (
    IGNORE_INDEX,
    ChatExample,
    CompletionExample,
    DataError,
    PreferenceExample,
    Source,
    TextExample,
    TokenizedExample,
)


@lru_cache(maxsize=None)
def load_tokenizer(shared_data: Path, name: str):
    """Real tokenizers from shared/data, loaded once per session (llama3.2-base takes ~3 s)."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder = shared_data / "tokenizers" / name
    if name == "gpt2":
        # The folder has only vocab.json + merges.txt: AutoTokenizer cannot pick a class. (In
        # transformers 5, GPT2TokenizerFast(vocab_file=..., merges_file=...) silently builds an
        # empty vocabulary; from_pretrained on the folder works in 4.x and 5.x.)
        return transformers.GPT2TokenizerFast.from_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tok(shared_data):
    return lambda name: load_tokenizer(shared_data, name)


S = "You are a terse assistant."
U1 = "What is 2+2?"
A1 = "2+2 equals 4."
U2 = "And 3*3, in French?"
A2 = "Neuf, café compris!"  # non-ASCII: byte-level BPE and byte-fallback split "é"

CONV = [
    {"role": "system", "content": S},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]


def expected(tokenizer, pieces):
    """Concatenate independently tokenised pieces: (text, trained) or (text, trained, after)."""
    ids, labels = [], []
    for piece in pieces:
        text, trained, after = (*piece, "") if len(piece) == 2 else piece
        ctx = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        both = tokenizer(after + text, add_special_tokens=False)["input_ids"]
        assert both[: len(ctx)] == ctx, f"context {after!r} is not atomic"
        part = both[len(ctx) :]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return ids, labels


def chatml_pieces(bos, system=S):
    sys = f"<|im_start|>system\n{system}<|im_end|>\n"
    return [
        (f"{bos}{sys}<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A1}<|im_end|>", True),
        (f"\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A2}<|im_end|>", True),
        ("\n", False),
    ]


def llama3_pieces(bos):
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    return [
        (f"{bos}{h('system')}{S}<|eot_id|>{h('user')}{U1}<|eot_id|>{h('assistant')}", False),
        (f"{A1}<|eot_id|>", True),
        (f"{h('user')}{U2}<|eot_id|>{h('assistant')}", False),
        (f"{A2}<|eot_id|>", True),
    ]


def llama2_pieces():
    # " {answer} </s>": the space before the answer and the one before </s> are the model's to produce.
    return [
        (f"<s>[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U1} [/INST]", False),
        (f" {A1} </s>", True),
        (f"<s>[INST] {U2} [/INST]", False),
        (f" {A2} </s>", True),
    ]


def mistral_pieces():
    # The answers are tokenised after their "[/INST]": alone, a SentencePiece tokenizer that adds a dummy
    # prefix (Mistral v0.1's under transformers 5.24) would read " 2+2" as two spaces, which the whole
    # rendered conversation never contains.
    return [
        (f"<s>{S}\n\n[INST] {U1} [/INST]", False),
        (f" {A1}</s>", True, "[/INST]"),
        (f"[INST] {U2} [/INST]", False, "</s>"),
        (f" {A2}</s>", True, "[/INST]"),
    ]


def phi3_pieces():
    # Phi-3's <|assistant|>, <|end|>, ... are rstrip tokens: they swallow the "\n" after them.
    return [
        (f"<|system|>\n{S}<|end|>\n<|user|>\n{U1}<|end|>\n<|assistant|>\n", False),
        (f"{A1}<|end|>", True, "<|assistant|>\n"),
        (f"\n<|user|>\n{U2}<|end|>\n<|assistant|>\n", False, "<|end|>"),
        (f"{A2}<|end|>", True, "<|assistant|>\n"),
        ("\n<|endoftext|>", False, "<|end|>"),  # the eos phi-3 appends after the last message
    ]


def alpaca_pieces(bos, eos):
    return [
        (f"{bos}{S}\n\n### Instruction:\n{U1}\n\n### Response:\n", False),
        (f"{A1}{eos}", True),
        (f"\n\n### Instruction:\n{U2}\n\n### Response:\n", False),
        (f"{A2}{eos}", True),
        ("\n\n", False),
    ]


CASES = {
    # id: (tokenizer folder, built-in template, pieces)
    "qwen2.5/qwen2.5": ("qwen2.5-0.5b-instruct", "qwen2.5", lambda: chatml_pieces("")),
    "qwen2.5/chatml": ("qwen2.5-0.5b-instruct", "chatml", lambda: chatml_pieces("")),
    "gpt2/chatml": ("gpt2", "chatml", lambda: chatml_pieces("<|endoftext|>")),
    "gpt2/alpaca": ("gpt2", "alpaca", lambda: alpaca_pieces("<|endoftext|>", "<|endoftext|>")),
    "llama3.2/llama-3": ("llama3.2-base", "llama-3", lambda: llama3_pieces("<|begin_of_text|>")),
    "llama3.2/alpaca": ("llama3.2-base", "alpaca", lambda: alpaca_pieces("<|begin_of_text|>", "<|end_of_text|>")),
    "llama2/llama-2": ("llama2", "llama-2", llama2_pieces),
    "llama2/mistral": ("llama2", "mistral", mistral_pieces),
    "mistral/mistral": ("mistral-7b-v0.1", "mistral", mistral_pieces),
    "phi-3/phi-3": ("phi-3-mini", "phi-3", phi3_pieces),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trained_ids_match_independent_construction(tok, case):
    folder, template, pieces = CASES[case]
    tokenizer = tok(folder)
    got = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template(template))
    want_ids, want_labels = expected(tokenizer, pieces())
    assert got.input_ids == want_ids
    assert got.labels == want_labels
    # and the trained tokens read back as exactly the two answers, each with its end of turn
    assert got.num_trained > 0


@pytest.mark.parametrize("case", ["qwen2.5/qwen2.5", "llama3.2/llama-3", "phi-3/phi-3", "llama2/llama-2"])
def test_tokenizers_own_or_reference_template_masks_the_same(tok, case, shared_data):
    """The model's own template (or the chujiezheng reference) yields the same tokens and mask."""
    folder, template, _ = CASES[case]
    tokenizer = tok(folder)
    ref = {
        "llama-3": "llama-3-instruct.jinja",
        "llama-2": "llama-2-chat.jinja",
    }.get(template)
    if ref:
        text = (shared_data / "chat_templates" / "chujiezheng" / ref).read_text()
        reference = text.replace("    ", "").replace("\n", "")
    else:
        reference = tokenizer.chat_template
    a = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template(template))
    b = tokenize_chat(ChatExample(CONV), tokenizer, reference)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_qwen_default_system_prompt_is_masked(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    got = tokenize_chat(ChatExample(CONV[1:]), tokenizer, builtin_template("qwen2.5"))
    want = expected(tokenizer, chatml_pieces("", system=default))
    assert (got.input_ids, got.labels) == want


def test_qwen_tools_and_tool_calls(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ]
    got = tokenize_chat(ChatExample(messages, tools=tools), tokenizer, builtin_template("qwen2.5"))
    system = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        "signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(tools[0]) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
    )
    pieces = [
        (system + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', True),
        ('\n<|im_start|>user\n<tool_response>\n{"celsius": 21}\n</tool_response><|im_end|>\n'
         "<|im_start|>assistant\n", False),
        ("It is 21 C in Paris.<|im_end|>", True),
        ("\n", False),
    ]
    assert (got.input_ids, got.labels) == expected(tokenizer, pieces)


def test_loss_on_all_trains_every_token(tok):
    tokenizer = tok("llama3.2-base")
    got = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template("llama-3"), loss_on="all")
    ids, _ = expected(tokenizer, llama3_pieces("<|begin_of_text|>"))
    assert got.input_ids == ids and got.labels == ids


def test_loss_weight_zero_turn_is_not_trained(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    conv = [dict(m) for m in CONV]
    conv[2]["loss_weight"] = 0.0
    got = tokenize_chat(ChatExample(conv), tokenizer, builtin_template("chatml"))
    pieces = chatml_pieces("")
    pieces[1] = (pieces[1][0], False)
    assert (got.input_ids, got.labels) == expected(tokenizer, pieces)


def test_no_double_bos(tok):
    tokenizer = tok("llama2")  # adds <s> itself when add_special_tokens=True
    got = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template("llama-2"))
    assert got.input_ids[0] == tokenizer.bos_token_id and got.input_ids[1] != tokenizer.bos_token_id


def test_max_length_keeps_the_start(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    full = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template("chatml"))
    cut = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template("chatml"), max_length=20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_real_alpaca_rows_train_exactly_the_answers(tok, shared_data):
    """On 60 real rows: the trained tokens decode to the output followed by the end of turn."""
    rows = json.loads((shared_data / "sft_alpaca" / "llamafactory_alpaca_en_demo.json").read_text())[:60]
    for folder, name, eot in [("qwen2.5-0.5b-instruct", "qwen2.5", "<|im_end|>"),
                              ("llama3.2-base", "llama-3", "<|eot_id|>")]:
        tokenizer = tok(folder)
        template = builtin_template(name)
        for row in rows:
            user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            got = tokenize_chat(ChatExample(messages), tokenizer, template)
            trained = [t for t in got.labels if t != IGNORE_INDEX]
            answer = row["output"].strip() if name == "llama-3" else row["output"]  # llama-3 trims
            assert trained == tokenizer(answer + eot, add_special_tokens=False)["input_ids"]
            # the trained tokens are one contiguous run ending at the end of turn
            first = got.labels.index(trained[0])
            assert got.labels[first:first + len(trained)] == trained


# --- errors -----------------------------------------------------------------------------------


def test_template_that_rewrites_history_is_refused(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    # Marks the last message: rendering a prefix differs from the same turns inside the whole.
    rewriting = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last %}FINAL {% endif %}{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="prefix-preserving"):
        tokenize_chat(ChatExample(CONV, source=Source("chat.jsonl", 3, 4)), tokenizer, rewriting)
    try:
        tokenize_chat(ChatExample(CONV, source=Source("chat.jsonl", 3, 4)), tokenizer, rewriting)
    except DataError as e:
        assert str(e).startswith("chat.jsonl:4: ")


def test_end_of_turn_inside_content_is_refused(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    with pytest.raises(DataError, match="inside its text"):
        tokenize_chat(ChatExample(conv), tokenizer, builtin_template("chatml"))


def test_assistant_first_is_refused(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    with pytest.raises(DataError, match="starts with an assistant"):
        tokenize_chat(ChatExample([{"role": "assistant", "content": "x"}]), tokenizer, builtin_template("chatml"))


def test_tools_on_a_template_without_tool_support_are_refused(tok):
    tokenizer = tok("llama3.2-base")
    ex = ChatExample(CONV, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(DataError, match="never reads `tools`"):
        tokenize_chat(ex, tokenizer, builtin_template("llama-3"))


def test_template_errors_become_data_errors(tok):
    tokenizer = tok("llama2")
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}]
    with pytest.raises(DataError, match="alternate"):
        tokenize_chat(ChatExample(conv), tokenizer, builtin_template("llama-2"))


def test_unknown_end_of_turn_trains_the_stripped_turn(tok):
    tokenizer = tok("gpt2")
    plain = ("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:\n{% endif %}")
    conv = CONV[1:3]
    got = tokenize_chat(ChatExample(conv), tokenizer, plain)
    pieces = [(f"user:\n{U1}\n\nassistant:\n", False), (A1, True), ("\n\n", False)]
    assert (got.input_ids, got.labels) == expected(tokenizer, pieces)
    # an explicit end_of_turn overrides the guess
    with pytest.raises(DataError, match="does not contain the end-of-turn"):
        tokenize_chat(ChatExample(conv), tokenizer, plain, end_of_turn="<|im_end|>")


class _NoOffsets:
    """A tokenizer without offset mapping (like a slow tokenizer), delegating everything else."""

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._inner(text, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("case", ["qwen2.5/qwen2.5", "llama2/llama-2", "phi-3/phi-3", "gpt2/chatml"])
def test_slow_path_without_offsets_gives_the_same_mask(tok, case):
    folder, template, _ = CASES[case]
    tokenizer = tok(folder)
    fast = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template(template))
    slow = tokenize_chat(ChatExample(CONV), _NoOffsets(tokenizer), builtin_template(template))
    assert (fast.input_ids, fast.labels) == (slow.input_ids, slow.labels)


# --- text and completion ----------------------------------------------------------------------


def test_text_bos_and_eos(tok):
    llama2, gpt2 = tok("llama2"), tok("gpt2")
    got = tokenize_text(TextExample("Hello world."), llama2)
    assert got.input_ids == [llama2.bos_token_id] + llama2("Hello world.", add_special_tokens=False)["input_ids"] + [
        llama2.eos_token_id]
    assert got.labels == got.input_ids
    got = tokenize_text(TextExample("Hello world."), gpt2, add_eos=False)
    assert got.input_ids == gpt2("Hello world.")["input_ids"]
    assert len(tokenize_text(TextExample("a " * 50), gpt2, max_length=8)) == 8


@pytest.mark.parametrize("folder", ["llama2", "gpt2", "qwen2.5-0.5b-instruct"])
def test_completion_masks_the_prompt(tok, folder):
    tokenizer = tok(folder)
    prompt, completion = "Translate to French: cheese\nAnswer:", " fromage"
    bos = [tokenizer.bos_token_id] if folder == "llama2" else []
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    got = tokenize_completion(CompletionExample(prompt, completion), tokenizer, completion_only=True)
    assert got.input_ids == bos + p + c
    assert got.labels == [IGNORE_INDEX] * (len(bos) + len(p)) + c
    got = tokenize_completion(CompletionExample(prompt, completion), tokenizer, completion_only=False)
    assert got.labels == got.input_ids == bos + p + c


# --- preference -------------------------------------------------------------------------------

PROMPT = CONV[:4]
CHOSEN = [{"role": "assistant", "content": "Neuf."}]
REJECTED = [{"role": "assistant", "content": "Dix, je crois."}]


@pytest.mark.parametrize(
    "folder,template,prompt_end,completion,after",
    [
        ("qwen2.5-0.5b-instruct", "qwen2.5", "<|im_start|>assistant\n", "{}<|im_end|>", ""),
        ("llama3.2-base", "llama-3", "<|start_header_id|>assistant<|end_header_id|>\n\n", "{}<|eot_id|>", ""),
        ("llama2", "llama-2", " [/INST]", " {} </s>", ""),
        # the completion follows the special token <|assistant|> (see the module docstring)
        ("phi-3-mini", "phi-3", "<|assistant|>\n", "{}<|end|>", "<|assistant|>\n"),
    ],
)
def test_preference_pair(tok, folder, template, prompt_end, completion, after):
    tokenizer = tok(folder)
    pair = tokenize_preference(PreferenceExample(PROMPT, CHOSEN, REJECTED), tokenizer, builtin_template(template))
    prompt_text = tokenizer.apply_chat_template(PROMPT, chat_template=builtin_template(template),
                                                add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith(prompt_end)
    assert pair.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    for ids, msg in ((pair.chosen_ids, CHOSEN), (pair.rejected_ids, REJECTED)):
        want, _ = expected(tokenizer, [(completion.format(msg[0]["content"]), True, after)])
        assert ids == want


def test_preference_truncation(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    full = tokenize_preference(PreferenceExample(PROMPT, CHOSEN, REJECTED), tokenizer, builtin_template("chatml"))
    cut = tokenize_preference(PreferenceExample(PROMPT, CHOSEN, REJECTED), tokenizer, builtin_template("chatml"),
                              max_prompt_length=10, max_length=13)
    assert cut.prompt_ids == full.prompt_ids[-10:]
    assert cut.chosen_ids == full.chosen_ids[:3] and cut.rejected_ids == full.rejected_ids[:3]
    with pytest.raises(DataError, match="no room"):
        tokenize_preference(PreferenceExample(PROMPT, CHOSEN, REJECTED), tokenizer, builtin_template("chatml"),
                            max_length=10)


# --- over-long, warnings, display -------------------------------------------------------------


def test_apply_overlong():
    ex = TokenizedExample(list(range(10)), list(range(10)), Source("d.jsonl", 0, 1))
    assert apply_overlong(ex, 10, "error") is ex
    assert apply_overlong(ex, 4, "truncate").input_ids == [0, 1, 2, 3]
    assert apply_overlong(ex, 4, "drop") is None
    with pytest.raises(DataError, match="d.jsonl:1"):
        apply_overlong(ex, 4, "error")


def test_warnings(tok):
    phi3, gpt2, qwen = tok("phi-3-mini"), tok("gpt2"), tok("qwen2.5-0.5b-instruct")
    assert any("pad token == eos" in w for w in check_trained_tokens([], phi3))
    assert any("not a single token" in w for w in check_trained_tokens([], gpt2, builtin_template("chatml")))
    good = tokenize_chat(ChatExample(CONV), qwen, builtin_template("qwen2.5"))
    assert check_trained_tokens([good], qwen, builtin_template("qwen2.5")) == []
    untrained = TokenizedExample(good.input_ids, [IGNORE_INDEX] * len(good))
    assert any("never trained" in w for w in check_trained_tokens([untrained], qwen, builtin_template("qwen2.5")))


def test_render_tokens(tok):
    tokenizer = tok("qwen2.5-0.5b-instruct")
    ex = tokenize_chat(ChatExample(CONV), tokenizer, builtin_template("chatml"))
    plain = render_tokens(ex, tokenizer, color=False)
    assert f"[[{A1}<|im_end|>]]" in plain and f"[[{A2}<|im_end|>]]" in plain
    assert plain.count("[[") == 2 and "\x1b[" not in plain
    colored = render_tokens(ex, tokenizer, color=True)
    assert "\x1b[" in colored and A1 not in colored  # coloured token by token
    table = token_table(ex, tokenizer)
    assert [row[1] for row in table] == ex.input_ids
    assert [row[3] for row in table] == [label != IGNORE_INDEX for label in ex.labels]
