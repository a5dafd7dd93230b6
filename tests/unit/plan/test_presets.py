"""Presets: `model_size` (seed 002's per-size defaults) and `preset: <family>` fragments fill only what the
user left out, and every value they fill is recorded as derived (run.json)."""

import textwrap

import pytest

from lmpipeline.config.errors import ConfigError
from lmpipeline.config.loader import load_config
from lmpipeline.config import presets


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


PIPELINE = textwrap.dedent("""
    model_name_or_path: some/model
    output_dir: out
    stages: [sft, dpo]
    stage_configs:
      sft:
        dataset_name_or_path: d.jsonl
      dpo:
        dataset_name_or_path: p.jsonl
""")

# Seed 002: "Default LoRA settings per model" and "Training Hyperparameters".
SEED_002 = {
    "7b": dict(lora_r=16, lora_alpha=32, per_device_train_batch_size=4, gradient_accumulation_steps=4),
    "13b": dict(lora_r=32, lora_alpha=64, per_device_train_batch_size=2, gradient_accumulation_steps=8),
    "70b": dict(lora_r=64, lora_alpha=128, per_device_train_batch_size=1, gradient_accumulation_steps=16),
}


@pytest.mark.parametrize("size", list(SEED_002))
def test_model_size_applies_seed_002_defaults(tmp_path, size):
    cfg = load_config(write(tmp_path, PIPELINE + f"model_size: {size}\n"))
    sft, dpo = cfg.stage("sft"), cfg.stage("dpo")
    for key, value in SEED_002[size].items():
        assert getattr(sft, key) == value and getattr(dpo, key) == value
        assert cfg._derived[f"stage_configs.sft.{key}"] == value
        assert cfg._derived["preset_sources"][f"stage_configs.sft.{key}"] == f"model_size {size}"
    assert (sft.lora_dropout, sft.max_seq_length, sft.learning_rate, sft.num_train_epochs) == (0.05, 2048, 2e-5, 3)
    # DPO keeps its own learning rate and epochs (seed 004), not SFT's 2e-5
    assert dpo.learning_rate == 5e-5 and "stage_configs.dpo.learning_rate" not in cfg._derived


def test_user_values_always_win(tmp_path):
    p = write(tmp_path, PIPELINE.replace("dataset_name_or_path: d.jsonl",
                                         "dataset_name_or_path: d.jsonl\n    lora_r: 8\n    learning_rate: 1e-4")
              + "model_size: 13b\n")
    cfg = load_config(p, ["stage_configs.sft.per_device_train_batch_size=7"])
    sft = cfg.stage("sft")
    assert (sft.lora_r, sft.learning_rate, sft.per_device_train_batch_size) == (8, 1e-4, 7)
    assert sft.lora_alpha == 64  # not set by the user: the preset's
    for key in ("lora_r", "learning_rate", "per_device_train_batch_size"):
        assert f"stage_configs.sft.{key}" not in cfg._derived


def test_family_preset_fills_model_and_its_size_class(tmp_path):
    p = write(tmp_path, """
        preset: llama-3.2-3b
        output_dir: out
        stages: [sft]
        stage_configs:
          sft:
            dataset_name_or_path: d.jsonl
            bf16: false
    """)
    cfg = load_config(p)
    assert cfg.model_name_or_path == "meta-llama/Llama-3.2-3B-Instruct" and cfg.model_size == "7b"
    sft = cfg.stage("sft")
    assert sft.bf16 is False  # the user's
    assert sft.lora_target_modules == "all-linear" and sft.gradient_checkpointing == "auto"
    assert sft.lora_r == 16 and sft.per_device_train_batch_size == 4  # from its size class
    d = cfg._derived
    assert d["model_name_or_path"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert d["preset_sources"]["model_name_or_path"] == "preset llama-3.2-3b"
    assert d["preset_sources"]["stage_configs.sft.lora_r"] == "preset llama-3.2-3b (model_size 7b)"
    assert "stage_configs.sft.bf16" not in d


def test_explicit_model_size_beats_the_family_class_and_model_wins(tmp_path):
    cfg = load_config(write(tmp_path, PIPELINE + "preset: qwen2.5-7b\nmodel_size: 70b\n"))
    assert cfg.model_name_or_path == "some/model" and "model_name_or_path" not in cfg._derived
    assert cfg.stage("sft").lora_r == 64


def test_no_preset_no_derived_values(tmp_path):
    cfg = load_config(write(tmp_path, PIPELINE))
    assert cfg._derived == {} and cfg.preset is None and cfg.stage("sft").lora_r == 16


def test_unknown_preset_and_size_are_config_errors(tmp_path):
    p = write(tmp_path, PIPELINE + "preset: llama-3.2-3bb\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown preset `llama-3.2-3bb`" in msg and "did you mean `llama-3.2-3b`" in msg and f"{p}:10" in msg
    with pytest.raises(ConfigError, match="model_size"):
        load_config(write(tmp_path, PIPELINE + "model_size: 8b\n", "d.yaml"))


def test_sectioned_form_takes_a_preset(tmp_path):
    p = write(tmp_path, """
        model:
          preset: qwen2.5-0.5b
        dataset:
          path: d.jsonl
        training:
          max_steps: 5
    """)
    cfg = load_config(p)
    assert cfg.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.stage("sft").max_steps == 5
    assert cfg.stage("sft").lora_alpha == 32


@pytest.mark.parametrize("name", presets.available_presets())
def test_every_preset_validates_and_names_its_architecture(tmp_path, name):
    frag = presets.load_preset(name)
    assert frag["architecture"] in presets.shipped_architectures()
    assert frag["model_size"] in presets.MODEL_SIZES
    # the model id it fills in resolves, by name, to the same shipped architecture
    assert presets.match_shipped(frag["config"]["model_name_or_path"]) == frag["architecture"]
    cfg = load_config(write(tmp_path, PIPELINE.replace("model_name_or_path: some/model\n", "") + f"preset: {name}\n"))
    for stage in ("sft", "dpo"):
        cfg.stage(stage)  # every filled key is a valid stage key
    arch = presets.resolve_architecture(cfg.model_name_or_path, preset=name)
    assert arch.name == frag["architecture"]


def test_run_json_gets_the_derived_values(tmp_path):
    from lmpipeline.pipeline import resolve_output_dir

    cfg = load_config(write(tmp_path, PIPELINE + "model_size: 7b\n"))
    _, derived = resolve_output_dir(cfg, None)
    assert derived["stage_configs.sft.lora_alpha"] == 32 and "preset_sources" in derived
