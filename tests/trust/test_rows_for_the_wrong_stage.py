"""Messages that send the user's data where it belongs: rows of one method's kind given to another stage
name the stage that trains them, and preference pairs that are all too long name the limit to change.
Each case checks the exit code, the message and that the data file is byte-identical afterwards."""

from __future__ import annotations

import json

import pytest

from tests.trust._util import run_cli, tree_hashes, write_config

pytestmark = pytest.mark.integration

KTO_ROWS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
             "label": i % 2 == 0} for i in range(8)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, tiny_model, data, stage: str, capsys, **params):
    stage_params = {"dataset_name_or_path": str(data), "max_steps": 1, "max_samples": 8, **params}
    cfg = write_config(tmp_path, tiny_model, data, stages=(stage,), extra_stage_configs={stage: stage_params})
    before = tree_hashes(data)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert tree_hashes(data) == before
    assert "Traceback" not in out
    return code, out


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kto_rows_in_another_stage_name_the_kto_stage(tmp_path, tiny_model, capsys, stage):
    data = _jsonl(tmp_path / "kto.jsonl", KTO_ROWS)
    code, out = _run(tmp_path / "run", tiny_model, data, stage, capsys)
    assert code == 2, out
    assert "kto stage" in out and "kto.jsonl" in out, out
    assert "use dpo" not in out and "in an sft stage" not in out


def test_preference_rows_in_an_sft_stage_name_the_preference_stages(tmp_path, tiny_model, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(8)])
    code, out = _run(tmp_path / "run", tiny_model, data, "sft", capsys)
    assert code == 2, out
    assert "preference stage (dpo" in out and "pairs.jsonl" in out, out


def test_pairs_whose_prompts_all_overflow_name_max_prompt_length(tmp_path, tiny_model, capsys):
    long_prompt = " ".join(["word"] * 200)  # far over max_seq_length 32 in any tokenizer
    data = _jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"} for _ in range(8)])
    code, out = _run(tmp_path / "run", tiny_model, data, "dpo", capsys, max_seq_length=32)
    assert code == 2, out
    assert "stage_configs.dpo.max_prompt_length" in out and "every one of the 8 preference pairs" in out, out


def test_a_template_without_a_known_end_of_turn_names_a_key_that_exists(tiny_model):
    """The warning once told users to set `end_of_turn`, which no config has; it names chat_template."""
    from transformers import AutoTokenizer

    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.data.masking import check_trained_tokens

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # no turn terminator
    warnings = check_trained_tokens([], AutoTokenizer.from_pretrained(tiny_model), template)
    said = " ".join(warnings)
    assert "end-of-turn token" in said and "set chat_template" in said, warnings
    assert "end_of_turn" not in said and "chat_template" in SFTConfig.model_fields and "end_of_turn" not in SFTConfig.model_fields
