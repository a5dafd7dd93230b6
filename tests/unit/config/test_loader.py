"""Config loading: both seed shapes, --set overrides, every error at once with file:line."""

import textwrap

import pytest

from lmpipeline.config.errors import ConfigError
from lmpipeline.config.loader import load_config, parse_override
from lmpipeline.config.schema import DPOConfig, SFTConfig


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_pipeline_form_with_trl_sft_alias(tmp_path):
    p = write(tmp_path, """
        model_name_or_path: m
        output_dir: out
        stages: [trl_sft]
        stage_configs:
          trl_sft:
            dataset_name_or_path: d.jsonl
            learning_rate: 5e-5
            packing: true
            packing_strategy: ffd
    """)
    cfg = load_config(p)
    st = cfg.stage("trl_sft")
    assert isinstance(st, SFTConfig)
    assert st.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string; the schema makes it a float
    assert st.packing_strategy == "ffd"
    assert cfg.stage_kinds == {"trl_sft": "sft"}


def test_sectioned_form_of_seed_000(repo_root):
    cfg = load_config(repo_root / "examples" / "seed000_config.yaml")
    st = cfg.stage("sft")
    assert cfg.model_name_or_path == "meta-llama/Llama-3.2-3B-Instruct"
    assert (st.use_4bit, st.lora_r, st.lora_alpha, st.lora_dropout) == (True, 16, 16, 0)
    assert st.optim == "adamw_8bit" and st.max_steps == 20 and st.gradient_accumulation_steps == 4
    assert st.dataset_name_or_path == "yahma/alpaca-cleaned" and st.dataset_format == "alpaca"
    assert st.max_samples == 1000 and st.max_seq_length == 2048
    assert st.lora_target_modules[0] == "q_proj"


def test_all_errors_reported_with_lines_and_did_you_mean(tmp_path):
    p = write(tmp_path, """\
        model_name_or_path: m
        stages:
          - trl_sft
          - dpoo
        stage_configs:
          trl_sft:
            lora_r: 0
            lora_rr: 3
            optim: adamw8bit
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    assert f"{p}:4: stages[1]: unknown stage `dpoo` (did you mean `dpo`?)" in text
    assert f"{p}:7: stage_configs.trl_sft.lora_r: Input should be greater than 0" in text
    assert f"{p}:8: stage_configs.trl_sft.lora_rr: unknown key (did you mean `lora_r`?)" in text
    assert f"{p}:9: stage_configs.trl_sft.optim: unknown optimizer `adamw8bit` (did you mean `adamw_8bit`?)" in text
    assert len(e.value.issues) == 4


def test_sectioned_unknown_key_has_line(tmp_path):
    p = write(tmp_path, """\
        model:
          name: m
        lora:
          rank: 8
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:4: lora.rank: unknown key" in str(e.value)


def test_set_overrides_typed_and_validated(tmp_path):
    p = write(tmp_path, """
        model_name_or_path: m
        stages: [sft]
        stage_configs: {sft: {dataset_name_or_path: d.jsonl}}
    """)
    cfg = load_config(p, ["stage_configs.sft.learning_rate=1e-4", "stage_configs.sft.packing=true", "output_dir=/x"])
    assert cfg.stage("sft").learning_rate == 1e-4 and cfg.stage("sft").packing is True and cfg.output_dir == "/x"
    with pytest.raises(ConfigError) as e:
        load_config(p, ["stage_configs.sft.lora_dropout=2"])
    assert "--set: stage_configs.sft.lora_dropout" in str(e.value)


def test_sectioned_override_by_section_name(repo_root):
    cfg = load_config(repo_root / "examples" / "seed000_config.yaml", ["model.name=/tmp/tiny", "dataset.path=x.json"])
    assert cfg.model_name_or_path == "/tmp/tiny"
    assert cfg.stage("sft").dataset_name_or_path == "x.json"


def test_set_reaches_every_section_of_the_sectioned_form(repo_root):
    """`training.*`, `lora.*`, `model.*`, `dataset.*` and top-level keys, as README documents them."""
    cfg = load_config(repo_root / "examples" / "seed000_config.yaml", [
        "training.learning_rate=1e-4", "training.warmup_ratio=0.1", "training.output_dir=out/x",
        "lora.r=8", "model.max_seq_length=512", "dataset.format=custom", "output_dir=out/y"])
    sft = cfg.stage("sft")
    assert (sft.learning_rate, sft.warmup_ratio, sft.lora_r, sft.max_seq_length) == (1e-4, 0.1, 8, 512)
    assert sft.dataset_format == "text"  # the section's own name for it, translated as in the file
    assert cfg.output_dir == "out/y"  # the later --set wins over training.output_dir
    assert load_config(repo_root / "examples" / "seed000_config.yaml", ["training.output_dir=out/x"]).output_dir == "out/x"


def test_set_unknown_sectioned_key_names_set_and_the_closest_key(repo_root):
    with pytest.raises(ConfigError) as e:
        load_config(repo_root / "examples" / "seed000_config.yaml",
                    ["lora.rank=8", "training.lerning_rate=1e-4", "training=3"])
    text = str(e.value)
    assert "lora.rank" in text and "--set" in text and "unknown key" in text
    assert "stage_configs.sft.lerning_rate" in text and "learning_rate" in text
    assert "training: unknown key; give one key: training.KEY=VALUE" in text
    assert "seed000_config.yaml:20" not in text  # no line of the file is blamed for an override


def test_python_tags_are_refused(tmp_path):
    p = write(tmp_path, "model_name_or_path: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "Python tags are refused" in str(e.value) and f"{p}:1" in str(e.value)


def test_stages_inferred_from_stage_configs(repo_root):
    cfg = load_config(repo_root / "examples" / "seed001_trl_sft_chat.yaml")
    assert cfg.stages == ["trl_sft"] and cfg._derived == {"stages": ["trl_sft"]}
    assert cfg.stage("trl_sft").assistant_only_loss is True


def test_inconsistent_quantisation_rejected():
    with pytest.raises(ValueError, match="exclusive"):
        SFTConfig(use_4bit=True, use_8bit=True)
    with pytest.raises(ValueError, match="use_lora"):
        SFTConfig(use_4bit=True, use_lora=False)


def test_dpo_defaults_follow_seed_004():
    c = DPOConfig()
    assert (c.beta, c.loss_type, c.learning_rate) == (0.1, "sigmoid", 5e-5)


def test_parse_override_values():
    assert parse_override("a.b=3") == (("a", "b"), 3)
    assert parse_override("a=1e-4") == (("a",), 1e-4)
    assert parse_override("a=[q_proj, v_proj]") == (("a",), ["q_proj", "v_proj"])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_micro_batch_tokens_checked_against_the_longest_row(tmp_path):
    p = write(tmp_path, """\
        model_name_or_path: m
        stages: [sft]
        stage_configs:
          sft:
            dataset_name_or_path: d.jsonl
            max_seq_length: 1024
            micro_batch_tokens: 512
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:7: stage_configs.sft.micro_batch_tokens: micro_batch_tokens 512 is below max_seq_length 1024" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["stage_configs.sft.micro_batch_tokens=lots"])
    assert "stage_configs.sft.micro_batch_tokens: expected a positive number of tokens" in str(e.value)
    cfg = load_config(p, ["stage_configs.sft.micro_batch_tokens=auto"])
    assert cfg.stage("sft").micro_batch_tokens == "auto"


def test_config_reference_is_current(repo_root):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(repo_root / "scripts" / "config_reference.py"), "--check"])
    assert done.returncode == 0, "docs/config.md is stale: run `python scripts/config_reference.py`"
