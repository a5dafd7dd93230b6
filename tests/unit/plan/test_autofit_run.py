"""A real (tiny, CPU) pipeline run with `auto` values: every stage sees concrete values, and run.json
records what auto resolved to."""

import json

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, shared_data):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-0.5b-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_auto_values_resolve_on_cpu_and_are_recorded(tmp_path, tiny_llama, quickstart_data, capsys):
    from lmpipeline.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(f"""
model_name_or_path: {tiny_llama}
output_dir: {tmp_path / 'out'}
stages: [sft, dpo]
stage_configs:
  sft:
    dataset_name_or_path: {quickstart_data / 'sft_train.jsonl'}
    max_samples: 32
    max_steps: 2
    per_device_train_batch_size: auto
    gradient_checkpointing: auto
    gradient_accumulation_steps: 2
    max_seq_length: 128
    save_strategy: "no"
  dpo:
    dataset_name_or_path: {quickstart_data / 'dpo_train.jsonl'}
    max_samples: 16
    max_steps: 1
    per_device_train_batch_size: auto
    global_batch_size: 4
    max_seq_length: 128
    save_strategy: "no"
""")
    assert main(["run", str(p)]) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    d = record["derived"]
    assert d["stage_configs.sft.per_device_train_batch_size"] == 4  # no GPU: the default micro-batch
    assert d["stage_configs.sft.gradient_accumulation_steps"] == 2
    assert d["stage_configs.sft.gradient_checkpointing"] is False
    assert d["stage_configs.dpo.per_device_train_batch_size"] * d["stage_configs.dpo.gradient_accumulation_steps"] == 4
    # the config as written keeps "auto"; the derived values say what it meant
    assert record["config"]["stage_configs"]["sft"]["per_device_train_batch_size"] == "auto"
    assert all(st["status"] == "done" for st in record["stages"].values())


def test_probe_step_runs_the_heaviest_micro_batch(tiny_llama, quickstart_data):
    """The GPU probe's step on CPU: it runs the longest padded micro-batch of epoch 0 and leaves no gradients."""
    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.data.build import build_sft_data
    from lmpipeline.methods.sft import SFTObjective
    from lmpipeline.models import loading
    from lmpipeline.plan.autofit import sft_probe_step

    cfg = SFTConfig(stage_name="sft", output_dir="unused", dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"),
                    max_samples=40, max_seq_length=128)
    tok = loading.load_tokenizer(str(tiny_llama))
    data = build_sft_data(cfg, tok)
    model = loading.apply_lora(loading.load_model(str(tiny_llama), cfg), cfg)
    seen = []
    objective = SFTObjective()
    original = objective.loss

    def spy(model, batch, total):
        seen.append(tuple(batch["input_ids"].shape))
        return original(model, batch, total)

    objective.loss = spy
    step = sft_probe_step(model, cfg, data, tok, objective, torch.device("cpu"))
    step(4, False)
    longest = max(len(e) for e in data.train)
    assert seen == [(4, longest)]
    assert all(p.grad is None for p in model.parameters())
