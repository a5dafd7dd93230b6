"""A small random Llama for GPU tests, wide enough for bitsandbytes to quantise."""

import pytest
import torch


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory, tiny_model):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Wider than the CPU tiny model: bitsandbytes quantises Linear layers whose shapes are multiples of 64.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpu-model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


