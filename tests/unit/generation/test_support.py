"""Which models the engine serves itself, and why not the others (they go to model.generate)."""

import torch

from lmpipeline.generation.forward import unsupported_reason


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, **kw))


def test_llama_is_served_and_other_families_are_not():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert unsupported_reason(_llama()) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)


def test_a_model_spread_over_devices_is_not_served():
    model = _llama()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": 1}
    assert "2 devices" in unsupported_reason(model)


def test_a_sliding_window_matters_only_when_sequences_are_longer():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert unsupported_reason(model, max_len=8) is None
    assert "sliding window of 8" in unsupported_reason(model, max_len=9)


def test_dynamic_rope_scaling_is_flagged_for_eager_decoding():
    from lmpipeline.generation.forward import rope_reads_positions_on_host

    assert not rope_reads_positions_on_host(_llama())
    scaled = _llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert rope_reads_positions_on_host(scaled)
