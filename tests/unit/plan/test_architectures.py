"""Shipped architecture configs: they load with transformers, their parameter counts match the published
sizes and the estimator's own count, and Hub ids find them by name."""

import json

import pytest
import torch

from lmpipeline.config import presets
from lmpipeline.config.presets import Architecture, load_shipped, match_shipped, resolve_architecture

# Published sizes (model cards / reports), in billions of parameters.
PUBLISHED = {
    "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03, "llama-3.1-8b-instruct": 8.03,
    "llama-3.1-70b": 70.55, "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98,
    "qwen2.5-0.5b-instruct": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.77, "qwen2.5-32b": 32.76, "qwen2.5-72b": 72.71, "qwen2-7b-instruct": 7.62,
    "qwen3-0.6b": 0.60, "mistral-7b-v0.3": 7.25, "gemma-2-2b": 2.61, "gemma-2-9b": 9.24,
    "phi-3-mini-4k-instruct": 3.82,
}


def test_every_shipped_config_is_known_and_documented():
    shipped = presets.shipped_architectures()
    assert sorted(shipped) == sorted(PUBLISHED)
    readme = (presets.MODEL_CONFIG_DIR / "README.md").read_text()
    for name in shipped:
        assert f"`{name}/`" in readme or name.split("-")[0] in readme, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_transformers_and_the_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(presets.MODEL_CONFIG_DIR / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    arch = load_shipped(name)
    assert arch.total_params == real
    assert arch.total_params / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01)


def test_restored_layer_counts_of_the_ipex_configs(shared_data):
    for name, layers in [("llama-3.1-8b-instruct", 32), ("qwen2-7b-instruct", 28), ("qwen3-0.6b", 28),
                         ("phi-3-mini-4k-instruct", 32)]:
        ours = json.loads((presets.MODEL_CONFIG_DIR / name / "config.json").read_text())
        theirs = json.loads(next(shared_data.glob(f"model_configs/{name}__ipex-1layer/config.json")).read_text())
        assert theirs["num_hidden_layers"] == 1 and ours["num_hidden_layers"] == layers
        assert {k: v for k, v in ours.items() if k != "num_hidden_layers"} == \
               {k: v for k, v in theirs.items() if k != "num_hidden_layers"}


@pytest.mark.parametrize("ref, folder", [
    ("meta-llama/Llama-3.2-3B-Instruct", "llama-3.2-3b"),
    ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.1-70b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("meta-llama/Llama-2-13b-chat-hf", "llama-2-13b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b-instruct"),
    ("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2.5-32b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    ("unsloth/gemma-2-2b-it-bnb-4bit", "gemma-2-2b"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
])
def test_hub_ids_match_shipped_configs(ref, folder):
    assert match_shipped(ref) == folder
    arch = resolve_architecture(ref)
    assert arch.name == folder and "matched by name" in arch.source


def test_unknown_models_are_not_guessed():
    assert match_shipped("org/some-other-model-7b") is None
    assert resolve_architecture("org/some-other-model-7b") is None


def test_local_folder_and_adapter_folder(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (model / "config.json").write_text(json.dumps(cfg))
    arch = resolve_architecture(str(model))
    assert arch.hidden_size == 64 and arch.head_dim == 16 and str(model) in arch.source
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    assert resolve_architecture(str(adapter)).hidden_size == 64


def test_family_specifics():
    gemma = load_shipped("gemma-2-9b")
    assert gemma.attn_softcap == 50.0 and gemma.final_softcap == 30.0 and gemma.norms_per_layer == 4
    assert gemma.head_dim == 256 and gemma.tied_embeddings
    phi = load_shipped("phi-3-mini-4k-instruct")
    assert [m[0] for m in phi.linear_modules()] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert load_shipped("qwen2.5-7b").qkv_bias and load_shipped("qwen3-0.6b").qk_norm
    # The GUIDE's 3.21 GFLOP per token per pass (x 2 for multiply-add) on Llama-3.2-3B.
    assert load_shipped("llama-3.2-3b").matmul_params / 1e9 == pytest.approx(3.21, abs=0.01)
    assert isinstance(load_shipped("llama-3.2-3b"), Architecture)
