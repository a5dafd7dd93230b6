"""Nothing trains silently on something other than what the user wrote.

- YAML: a key written twice is an error naming both lines (YAML itself keeps the last one quietly);
  aliases expand within a budget.
- Numbers: NaN, infinity and values a run cannot use are refused at validation, naming the key and
  its file:line (a NaN learning rate used to train a no-op that reported "done").
- --resume: a changed resolved config or changed data file is refused unless --allow-changed-config,
  and then both old and new are recorded in run.json.
- A copied run folder is self-contained: merge and generate on the copy read the copy's adapter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.trust._util import run_cli, stopped_copy, tree_hashes, write_config

pytestmark = pytest.mark.integration


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(text))


def _set_sft(cfg, **values):
    raw = yaml.safe_load(cfg.read_text())
    raw["stage_configs"]["sft"].update(values)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))


# ---------------------------------------------------------------------------------------- YAML


def test_a_key_written_twice_is_an_error_with_both_lines(tmp_path, tiny_model, quickstart_data, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""model_name_or_path: {tiny_model}
output_dir: {tmp_path / 'run'}
stages: [sft]
stage_configs:
  sft:
    dataset_name_or_path: {quickstart_data / 'sft_train.jsonl'}
    learning_rate: 1.0e-4
    learning_rate: 1.0e-3
stage_configs:
  sft:
    dataset_name_or_path: {quickstart_data / 'sft_train.jsonl'}
""")
    before = tree_hashes(cfg)
    code, out = run_cli(["validate", str(cfg), "--config-only"], capsys)
    assert code == 2, out
    assert f"{cfg}:8: stage_configs.sft.learning_rate: duplicate key: written at line 7 and again at line 8" in out, out
    assert f"{cfg}:9: stage_configs: duplicate key: written at line 4 and again at line 9" in out, out
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2 and "duplicate key" in out
    assert not (tmp_path / "run").exists()
    assert tree_hashes(cfg) == before


def test_alias_expansion_has_a_budget(tmp_path, capsys):
    cfg = tmp_path / "laughs.yaml"
    rows = ["model_name_or_path: m", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdef", "bcdefg"):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    cfg.write_text("\n".join(rows) + "\n")
    code, out = run_cli(["validate", str(cfg), "--config-only"], capsys)
    assert code == 2, out
    assert "expands to more than 20,000 values through aliases" in out and str(cfg) in out


# ---------------------------------------------------------------------------------------- numbers

BAD_NUMBERS = [
    ("learning_rate", ".nan", "finite number"), ("learning_rate", ".inf", "finite number"),
    ("weight_decay", ".inf", "finite number"), ("adam_beta1", ".nan", "finite number"),
    ("adam_beta2", ".nan", "finite number"), ("adam_epsilon", ".inf", "finite number"),
    ("max_grad_norm", ".nan", "finite number"), ("warmup_ratio", ".nan", "finite number"),
    ("lora_alpha", ".inf", "finite number"), ("num_train_epochs", ".inf", "finite number"),
    ("seed", "-1", "must be in [0, 2**32 - 1]"), ("max_steps", "0", "must be a positive step count"),
    ("learning_rate", "5.0", "above 1 diverges"), ("loss_spike_factor", "0.5", "must be 0 (off) or at least 1"),
]


@pytest.mark.parametrize("key,value,expect", BAD_NUMBERS, ids=[f"{k}={v}" for k, v, _ in BAD_NUMBERS])
def test_unusable_numbers_are_refused_with_key_and_line(tmp_path, tiny_model, quickstart_data, capsys, key, value,
                                                        expect):
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl")
    cfg.write_text(cfg.read_text() + f"    {key}: {value}\n" if key not in yaml.safe_load(cfg.read_text())["stage_configs"]["sft"]
                   else cfg.read_text().replace(f"    {key}: ", f"    {key}: {value}  # was ", 1))
    line = _line_of(cfg, f"{key}:")
    code, out = run_cli(["validate", str(cfg), "--config-only"], capsys)
    assert code == 2, out
    assert f"{cfg}:{line}: stage_configs.sft.{key}: " in out and expect in out, out


def test_a_non_finite_learning_rate_never_trains(tmp_path, tiny_model, quickstart_data, capsys):
    cfg = write_config(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", max_steps=2)
    code, out = run_cli(["run", str(cfg), "--set", "stage_configs.sft.learning_rate=nan"], capsys)
    assert code == 2, out
    assert "--set: stage_configs.sft.learning_rate: Input should be a finite number" in out, out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- resume


@pytest.fixture()
def stopped_run(trained_run, tmp_path, quickstart_data):
    """A copy of the 2-step run, stopped in its stage, made with its own copy of the data."""
    data = tmp_path / "train.jsonl"
    shutil.copy(quickstart_data / "sft_train.jsonl", data)
    _, cfg = stopped_copy(trained_run, tmp_path, dataset_name_or_path=str(data))
    return cfg, data


def test_resume_with_a_changed_learning_rate_is_refused(stopped_run, capsys):
    cfg, data = stopped_run
    before = tree_hashes(cfg.parent / "run")
    code, out = run_cli(["run", str(cfg), "--resume", "--set", "stage_configs.sft.learning_rate=1e-3"], capsys)
    assert code == 2, out
    assert "--resume: the run in" in out and "stage_configs.sft.learning_rate: 0.002 -> 0.001" in out, out
    assert "--allow-changed-config" in out
    assert tree_hashes(cfg.parent / "run") == before


def test_resume_with_changed_data_is_refused_then_allowed_and_recorded(stopped_run, capsys):
    cfg, data = stopped_run
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    code, out = run_cli(["run", str(cfg), "--resume"], capsys)
    assert code == 2, out
    assert "stage_configs.sft.dataset_name_or_path (file contents)" in out, out
    code, out = run_cli(["run", str(cfg), "--resume", "--allow-changed-config",
                         "--set", "stage_configs.sft.max_steps=3"], capsys)
    assert code == 0, out[-3000:]
    record = json.loads((cfg.parent / "run" / "run.json").read_text())
    changes = record["resumed_with_changes"][-1]["changes"]
    assert changes["stage_configs.sft.max_steps"] == {"from": 2, "to": 3}
    assert "stage_configs.sft.dataset_name_or_path (file contents)" in changes
    assert record["config"]["stage_configs"]["sft"]["max_steps"] == 3
    assert record["stages"]["sft"]["global_step"] == 3


# ---------------------------------------------------------------------------------------- copied runs


def test_a_copied_run_uses_its_own_adapter(trained_run, tmp_path, capsys):
    original = tmp_path / "original"
    shutil.copytree(trained_run, original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    # The original's adapter is broken after the copy: reading it would fail or give other weights.
    (original / "sft" / "final" / "adapter_model.safetensors").write_bytes(b"not an adapter")
    code, out = run_cli(["merge", str(copy), "--output", str(tmp_path / "merged")], capsys)
    assert code == 0, out[-3000:]
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert [a["path"] for a in info["adapters"]] == [str(copy / "sft" / "final")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 plus 3?"}) + "\n")
    code, out = run_cli(["generate", str(copy), "--prompts", str(prompts), "--output", str(tmp_path / "gen.jsonl"),
                         "--max-new-tokens", "4"], capsys)
    assert code == 0, out[-3000:]
    assert json.loads((tmp_path / "gen.jsonl").read_text())["num_tokens"] >= 1
