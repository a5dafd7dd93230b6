"""models/attention.py: varlen attention over packed rows gives the padded model's loss and
gradients; the choice of implementation; switching back after training."""

from __future__ import annotations

import pytest
import torch

from lmpipeline.data.packing import collate_packed, collate_padded, flash_attn_kwargs
from lmpipeline.data.types import IGNORE_INDEX, TokenizedExample
from lmpipeline.models import attention


def _tiny_llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, **extra)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (5, 17, 9, 2, 30, 12, 1):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [t if k >= n // 3 else IGNORE_INDEX for k, t in enumerate(ids)]))
    return out


def _mean_ce(logits, labels):
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_attention_function_matches_sdpa_per_example_with_gqa():
    torch.manual_seed(0)
    lengths = [3, 7, 1, 5]
    total, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, hq, total, d), torch.randn(1, hkv, total, d), torch.randn(1, hkv, total, d)
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    module = torch.nn.Module().eval()
    out, weights = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu,
                                                      max_length_q=7)
    assert weights is None and out.shape == (1, total, hq, d)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e].repeat_interleave(2, 1), v[:, :, s:e].repeat_interleave(2, 1),
            is_causal=True, scale=0.3)
        assert torch.allclose(out[0, s:e], ref[0].transpose(0, 1), atol=1e-6)


def shared_prompt_case(device="cpu", dtype=torch.float32, hq=4, hkv=2, d=8, sizes=((4, 3, 5), (1, 6, 2), (6, 1, 1))):
    """q, k, v of a row of [prompt, chosen, rejected] runs, the shared-prompt kwargs (as
    preference.collate_pairs_shared builds them), and the expected output: each of prompt+chosen and
    prompt+rejected attended causally on its own."""
    torch.manual_seed(0)
    total = sum(sum(s) for s in sizes)
    q, k, v = (torch.randn(1, h, total, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    cu_q, cu_k, gather, expected = [0], [0], [], torch.empty(total, hq, d, device=device, dtype=dtype)
    start = 0
    for p, c, r in sizes:
        prompt, chosen, rejected = (list(range(a, a + n)) for a, n in ((start, p), (start + p, c), (start + p + c, r)))
        for keys, queries in ((prompt + chosen, prompt + chosen), (prompt + rejected, rejected)):
            gather.extend(keys)
            cu_k.append(len(gather))
            cu_q.append(cu_q[-1] + len(queries))
            ks, vs = (t[:, :, keys].repeat_interleave(hq // hkv, 1) for t in (k, v))
            full = torch.nn.functional.scaled_dot_product_attention(q[:, :, keys], ks, vs, is_causal=True, scale=0.3)
            expected[queries] = full[0, :, len(keys) - len(queries):].transpose(0, 1)
        start += p + c + r
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    kwargs = dict(cu_seq_lens_q=as_int(cu_q), max_length_q=max(b - a for a, b in zip(cu_q, cu_q[1:])),
                  cu_seq_lens_k=as_int(cu_k), max_length_k=max(b - a for a, b in zip(cu_k, cu_k[1:])),
                  kv_gather=torch.tensor(gather, device=device))
    return q, k, v, kwargs, expected


def test_shared_prompt_keys_give_each_sequence_its_own_attention():
    """kv_gather: a rejected reply attends to its prompt and to itself, as if it ran after the prompt alone."""
    q, k, v, kwargs, expected = shared_prompt_case()
    out, _ = attention.varlen_attention_forward(torch.nn.Module().eval(), q, k, v, None, scaling=0.3, **kwargs)
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_packed_varlen_model_equals_padded_sdpa_loss_and_gradients():
    exs = _examples()
    padded, packed = collate_padded(exs, pad_token_id=0), collate_packed(exs)
    model = _tiny_llama().train()
    ref_loss = _mean_ce(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                        padded["labels"])
    ref = _grads(model, ref_loss)
    assert attention.switch(model, attention.VARLEN) == "sdpa"
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                **flash_attn_kwargs(packed))
    loss = _mean_ce(out.logits, packed["labels"])
    assert torch.allclose(loss, ref_loss, atol=1e-5), (loss.item(), ref_loss.item())
    for a, b in zip(_grads(model, loss), ref):
        assert torch.allclose(a, b, atol=1e-5)
    # Control: without the boundaries the varlen implementation runs one causal sequence, examples see
    # each other, and the loss differs — the boundaries are what the equality above rests on.
    leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert not torch.allclose(_mean_ce(leaky, packed["labels"]), ref_loss, atol=1e-4)
    assert attention.switch(model, "sdpa") == attention.VARLEN


def test_right_padded_batch_without_boundaries_is_exact():
    """Eval batches are right-padded and carry no cu_seq_lens: causal SDPA without a mask is exact
    at every real position."""
    exs = _examples()
    padded = collate_padded(exs, pad_token_id=0)
    model = _tiny_llama().eval()
    with torch.no_grad():
        ref = _mean_ce(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                       padded["labels"])
        attention.switch(model, attention.VARLEN)
        got = _mean_ce(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                       padded["labels"])
    assert torch.allclose(got, ref, atol=1e-5)


def test_choice_of_implementation(monkeypatch):
    model = _tiny_llama()
    kw = dict(packed=True, max_seq_length=2048)
    # explicit choices are kept; unpacked batches never switch
    assert attention.attention_for(model, requested="eager", **kw) is None
    assert attention.attention_for(model, requested="varlen", packed=False, max_seq_length=2048) is None
    assert attention.attention_for(model, requested="varlen", **kw) == attention.VARLEN
    # auto needs the CUDA kernel
    monkeypatch.setattr(attention, "kernel_available", lambda device=None: False)
    assert attention.attention_for(model, requested=None, **kw) is None
    monkeypatch.setattr(attention, "kernel_available", lambda device=None: True)
    assert attention.attention_for(model, requested="auto", **kw) == attention.VARLEN
    # architectures the kernel does not compute exactly keep their attention
    windowed = _tiny_llama()
    windowed.config.sliding_window = 512
    assert attention.unsupported_reason(windowed, 2048) == "a sliding window of 512 tokens"
    assert attention.attention_for(windowed, requested="varlen", **kw) is None
    assert attention.unsupported_reason(windowed, 256) is None  # rows shorter than the window


def test_the_kernel_needs_an_ampere_or_newer_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, runs in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert attention.kernel_available() == (runs and attention._torch_varlen() is not None), capability


def test_padding_free_auto_follows_the_kernel(monkeypatch):
    """padding_free: auto is on where varlen runs, off with packing (bins are end to end already) and with
    NEFTune (its noise scales with the row length); explicit values are kept."""
    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.methods.sft import resolve_padding_free as resolve

    model = _tiny_llama()
    cfg = SFTConfig(stage_name="sft", output_dir="/tmp/unused", dataset_name_or_path="unused.jsonl")
    assert cfg.padding_free == "auto"
    monkeypatch.setattr(attention, "kernel_available", lambda device=None: False)
    assert resolve(cfg, model).padding_free is False
    monkeypatch.setattr(attention, "kernel_available", lambda device=None: True)
    assert resolve(cfg, model).padding_free is True
    for off in ({"packing": True}, {"neftune_noise_alpha": 5.0}, {"attn_implementation": "sdpa"}):
        assert resolve(cfg.model_copy(update=off), model).padding_free is False, off
    assert resolve(cfg.model_copy(update={"padding_free": False}), model).padding_free is False
    windowed = _tiny_llama()
    windowed.config.sliding_window = 512
    assert resolve(cfg, windowed).padding_free is False


def _sft_losses(tmp_path, tiny_model, quickstart_data, name, **kw):
    import json

    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.methods.sft import SFTStage

    out = tmp_path / name
    cfg = SFTConfig(stage_name="sft", output_dir=str(out), dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"),
                    max_steps=4, per_device_train_batch_size=2, max_seq_length=256, learning_rate=1e-3,
                    logging_steps=1, save_strategy="no", seed=1, use_lora=True, lora_r=4, lora_alpha=8,
                    lora_dropout=0.0, **kw)  # dropout masks depend on tensor shapes: off for exact comparisons
    stage = SFTStage(cfg)
    stage.execute(model_name_or_path=str(tiny_model))
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return stage, [r["loss"] for r in lines if "loss" in r], [r["tokens"] for r in lines if "tokens" in r]


@pytest.mark.integration
def test_sft_stage_trains_packed_with_varlen_and_switches_back(tmp_path, tiny_model, quickstart_data):
    stage, varlen, _ = _sft_losses(tmp_path, tiny_model, quickstart_data, "varlen", packing=True,
                                   attn_implementation="varlen")
    assert stage.model.get_base_model().config._attn_implementation == "sdpa"  # switched back
    _, sdpa, _ = _sft_losses(tmp_path, tiny_model, quickstart_data, "sdpa", packing=True, attn_implementation="sdpa")
    assert len(varlen) == 4 and varlen == pytest.approx(sdpa, rel=1e-4)


@pytest.mark.integration
def test_padding_free_gives_the_padded_batches_losses(tmp_path, tiny_model, quickstart_data):
    """padding_free: the same micro-batches as padded training, end to end in one row: same losses,
    and the real-token count per step (metrics "tokens") is the same too."""
    _, free, free_tokens = _sft_losses(tmp_path, tiny_model, quickstart_data, "free", padding_free=True,
                                       attn_implementation="varlen")
    _, padded, padded_tokens = _sft_losses(tmp_path, tiny_model, quickstart_data, "padded")
    assert free == pytest.approx(padded, rel=1e-4), (free, padded)
    assert free_tokens == padded_tokens and all(t > 0 for t in free_tokens)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_losses(tmp_path, tiny_model, quickstart_data):
    """Regional compile (models/compile.py) over packed varlen rows: same losses as eager, and the
    layers are eager again afterwards. Slow on CPU (Inductor compiles C++); run with -m slow."""
    stage, compiled, _ = _sft_losses(tmp_path, tiny_model, quickstart_data, "compiled", packing=True,
                                     attn_implementation="varlen", torch_compile=True)
    _, eager, _ = _sft_losses(tmp_path, tiny_model, quickstart_data, "eager", packing=True,
                              attn_implementation="varlen")
    assert compiled == pytest.approx(eager, rel=1e-3)
    from lmpipeline.models.compile import decoder_layers

    assert all(layer._compiled_call_impl is None for layer in decoder_layers(stage.model))
