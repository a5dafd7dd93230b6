"""models/speedups.py: what TrainingSpeedups switches on is exact and is undone on exit."""

from types import SimpleNamespace

import torch

from lmpipeline.models import attention
from lmpipeline.models.speedups import TrainingSpeedups


def _lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_input_casts_off_under_autocast_is_exact_and_restored():
    model = _lora_llama()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    cfg = SimpleNamespace(attn_implementation=None, max_seq_length=64, bf16=True, fp16=False, torch_compile=False,
                          stage_name="sft")
    flags = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and all(m.cast_input_dtype_enabled for m in flags)
    with TrainingSpeedups(model, cfg, packed=False) as speed:
        assert not speed.varlen
        assert not any(m.cast_input_dtype_enabled for m in flags)
        loss, grads = _loss_and_grads(model, ids)
    assert all(m.cast_input_dtype_enabled for m in flags)
    # bf16 -> fp32 -> bf16 is exact, so skipping the round trip changes nothing
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6), name


def test_fp32_training_keeps_the_casts_and_varlen_is_switched_back():
    model = _lora_llama()
    cfg = SimpleNamespace(attn_implementation="varlen", max_seq_length=64, bf16=False, fp16=False, torch_compile=False,
                          stage_name="sft")
    flags = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    with TrainingSpeedups(model, cfg, packed=True) as speed:
        assert speed.varlen and model.get_base_model().config._attn_implementation == attention.VARLEN
        assert all(m.cast_input_dtype_enabled for m in flags)  # no autocast: the casts are needed
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_compiled_layers_are_one_graph_each_and_match_eager():
    """transformers' output-capturing hooks (ContextVar.get, which Dynamo cannot trace) are set aside while
    the layers are compiled: no graph break, so each layer is one graph instead of three. The final hidden
    state the loss reads and its gradients equal eager's; uncompiling brings the hooks back
    (output_hidden_states works again)."""
    from torch._dynamo.utils import counters

    from lmpipeline.methods.logprobs import final_hidden_states
    from lmpipeline.models.compile import compile_decoder_layers, uncompile_decoder_layers

    torch._dynamo.reset()
    model = _lora_llama().float()
    model.enable_input_require_grads()  # as under checkpointing: every layer's input needs a gradient
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))

    def hidden_and_grads():
        model.zero_grad()
        hidden = final_hidden_states(model, {"input_ids": ids})
        hidden.pow(2).mean().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with torch.no_grad():  # transformers installs its capturing hooks at a first output_hidden_states call
        assert len(model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states) == 3
    eager_hidden, eager_grads = hidden_and_grads()
    counters.clear()
    assert compile_decoder_layers(model) == 2
    compiled_hidden, compiled_grads = hidden_and_grads()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # both layers share one graph, unbroken
    torch.testing.assert_close(compiled_hidden, eager_hidden, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)

    uncompile_decoder_layers(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers: the capturing hooks are back, once each
    torch.testing.assert_close(out.hidden_states[-1], eager_hidden)


def test_eager_rounding_makes_the_compiled_forwards_agree():
    """bf16: Inductor's default rounding differs between the no-gradient graph (a DPO reference pass) and
    the training graph (the policy), which shifted a compiled DPO run's first loss off ln 2 on the GPU.
    With eager_rounding both equal eager's forward, bit for bit here."""
    from lmpipeline.methods.logprobs import final_hidden_states
    from lmpipeline.models.compile import compile_decoder_layers, uncompile_decoder_layers

    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    differences = {}
    for eager_rounding in (False, True):
        torch._dynamo.reset()
        model = _lora_llama().to(torch.bfloat16)
        compile_decoder_layers(model, eager_rounding=eager_rounding)
        with torch.no_grad():
            reference = final_hidden_states(model, {"input_ids": ids})
        model.enable_input_require_grads()
        policy = final_hidden_states(model, {"input_ids": ids}).detach()
        uncompile_decoder_layers(model)
        with torch.no_grad():
            eager = final_hidden_states(model, {"input_ids": ids})
        differences[eager_rounding] = [(a.float() - b.float()).abs().max().item()
                                       for a, b in ((reference, policy), (policy, eager))]
    assert differences[True] == [0.0, 0.0]
    assert differences[False][0] > 0  # the control: without it the two graphs round differently
