"""LLaMA-Factory's per-turn loss_weight is honoured under every masking mode, and shown by data inspect.

The demo file marks every user turn `loss_weight: 0` and every assistant turn `1`. The expected trained
text is computed here from the tokenizer's own chat template, independently of lmpipeline's masking:
with assistant_only_loss false, the trained text of a one-exchange row is exactly the rendering after
the user turn (the assistant turn with its header and end of turn); with it true, the assistant content
and end of turn. Any weight other than 0 or 1 is refused with file:line.
"""

from __future__ import annotations

import json

import pytest

from lmpipeline.data.types import IGNORE_INDEX
from tests.trust._util import run_cli, tree_hashes, write_config

pytestmark = pytest.mark.integration


@pytest.fixture()
def lf_demo(shared_data):
    return shared_data / "sft_messages" / "llamafactory_v1_sft_demo.jsonl"


def _inspect(tmp_path, tiny_model, data, capsys, n, **sft):
    cfg = write_config(tmp_path, tiny_model, data, max_samples=n, max_seq_length=512, **sft)
    code, out = run_cli(["data", "inspect", str(cfg), "-n", str(n), "--jsonl"], capsys)
    assert code == 0, out[-2000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _messages(row):
    return [{"role": t["role"], "content": "".join(p["value"] for p in t["content"])} for t in row["messages"]]


@pytest.mark.parametrize("assistant_only", [False, True])
def test_loss_weight_zero_turns_are_never_trained(tmp_path, tiny_model, lf_demo, capsys, assistant_only):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in lf_demo.read_text().splitlines()[:3]]
    before = tree_hashes(lf_demo)
    shown = _inspect(tmp_path, tiny_model, lf_demo, capsys, 3, assistant_only_loss=assistant_only)
    assert len(shown) == 3
    for row, ex in zip(rows, shown):
        msgs = _messages(row)
        assert [t["loss_weight"] for t in row["messages"]] == [0.0, 1.0]
        trained = tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
        full = tok.apply_chat_template(msgs, tokenize=False)
        user_only = tok.apply_chat_template(msgs[:1], tokenize=False)
        if assistant_only:
            assert trained.startswith(msgs[1]["content"]) and msgs[0]["content"] not in trained.replace(msgs[1]["content"], "")
        else:
            assert trained == full[len(user_only):], (trained, full)
    assert tree_hashes(lf_demo) == before


def test_inspect_says_how_loss_weight_is_used(tmp_path, tiny_model, lf_demo, capsys):
    cfg = write_config(tmp_path, tiny_model, lf_demo, max_samples=2, max_seq_length=512, assistant_only_loss=False)
    code, out = run_cli(["data", "inspect", str(cfg), "-n", "1"], capsys)
    assert code == 0, out[-2000:]
    assert "a turn's loss_weight, where the data has one, wins: 0 = shown, not trained; 1 = trained" in out


@pytest.mark.parametrize("weight", ["2", "0.5", "-1", "1e999", "\"1\""])
def test_other_loss_weights_are_refused_with_file_and_line(tmp_path, tiny_model, capsys, weight):
    good = {"messages": [{"role": "user", "content": "hi", "loss_weight": 0},
                         {"role": "assistant", "content": "hello", "loss_weight": 1}]}
    bad = json.dumps(good).replace('"loss_weight": 1}', f'"loss_weight": {weight}}}')
    data = tmp_path / "weights.jsonl"
    data.write_text(json.dumps(good) + "\n" + bad + "\n")
    before = tree_hashes(data)
    cfg = write_config(tmp_path, tiny_model, data)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2, out
    assert f"{data}:2: " in out and "loss_weight must be 0 (not trained) or 1 (trained)" in out, out[-2000:]
    assert "Traceback" not in out
    assert tree_hashes(data) == before
