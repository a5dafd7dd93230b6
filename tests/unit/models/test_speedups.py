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
        assert torch.equal(grads[name], ref_grads[name]), name  # the same kernels on bitwise-same inputs


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


def _stage(**fields):
    from lmpipeline.config.schema import SFTConfig

    base = dict(stage_name="sft", output_dir="out", bf16=True, per_device_train_batch_size=2,
                gradient_accumulation_steps=4, num_train_epochs=1)
    return SFTConfig(**{**base, **fields})


def test_torch_compile_auto_compiles_only_long_measured_runs():
    """auto compiles where the bench measured it faster (LoRA/QLoRA, bf16, one CUDA GPU) and only for runs long
    enough to repay the one-off compile; every other case stays eager and says why."""
    from lmpipeline.models.compile import COMPILE_MIN_STEPS, compile_by_default

    long, short = COMPILE_MIN_STEPS, COMPILE_MIN_STEPS - 1
    assert compile_by_default(_stage(), optimizer_steps=long, cuda=True, processes=1)[0]
    assert compile_by_default(_stage(use_4bit=True), optimizer_steps=long, cuda=True, processes=1)[0]
    cases = {
        "no CUDA GPU": (_stage(), long, False, 1),
        "optimizer steps": (_stage(), short, True, 1),
        "only LoRA and 4-bit": (_stage(use_8bit=True), long, True, 1),
        "only LoRA": (_stage(use_lora=False), long, True, 1),
        "only bf16": (_stage(bf16=False), long, True, 1),
        "2 processes": (_stage(), long, True, 2),
    }
    for reason, (cfg, steps, cuda, processes) in cases.items():
        on, why = compile_by_default(cfg, optimizer_steps=steps, cuda=cuda, processes=processes)
        assert not on and reason in why, (reason, why)


def test_torch_compile_auto_counts_the_runs_optimizer_steps(monkeypatch, caplog):
    """The stage resolves auto from its data: rows per epoch / micro-batch / GA x epochs, or max_steps."""
    import logging

    from lmpipeline.models import speedups
    from lmpipeline.models.compile import COMPILE_MIN_STEPS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rows_for = lambda steps: steps * 2 * 4  # noqa: E731 - micro-batch 2 x GA 4 rows per step, one epoch
    assert _stage().torch_compile == "auto"
    with caplog.at_level(logging.INFO, logger="lmpipeline.models.speedups"):
        assert speedups.resolve_torch_compile(_stage(), rows_for(COMPILE_MIN_STEPS)).torch_compile is True
    assert f"torch_compile (auto): on, {COMPILE_MIN_STEPS} optimizer steps" in caplog.text
    assert speedups.resolve_torch_compile(_stage(), rows_for(COMPILE_MIN_STEPS) - 8).torch_compile is False
    assert speedups.resolve_torch_compile(_stage(num_train_epochs=2), rows_for(COMPILE_MIN_STEPS // 2)).torch_compile
    assert speedups.resolve_torch_compile(_stage(max_steps=20), rows_for(10_000)).torch_compile is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert speedups.resolve_torch_compile(_stage(), rows_for(10_000)).torch_compile is False
    # an explicit choice is kept as given
    assert speedups.resolve_torch_compile(_stage(torch_compile=True), 8).torch_compile is True
    assert speedups.resolve_torch_compile(_stage(torch_compile="false"), 10**6).torch_compile is False
