"""TokenLogps (chunked LM-head log-probs) against plain autograd, for both of its backward paths."""

import pytest
import torch
import torch.nn.functional as F

from lmpipeline.methods.logprobs import TokenLogps


def _inputs(head_trained: bool, with_bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(37, 16, generator=g, dtype=dtype).requires_grad_(head_trained)
    bias = torch.randn(37, generator=g, dtype=dtype).requires_grad_(head_trained) if with_bias else None
    targets = torch.randint(0, 37, (11,), generator=g)
    upstream = torch.randn(11, generator=g)  # per-token weights, as DPO's sigmoid factors give
    return hidden, weight, bias, targets, upstream


def _reference(hidden, weight, bias, targets):
    return F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("head_trained", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [3, 64], ids=["chunked", "one-chunk"])
def test_values_and_gradients_match_autograd(head_trained, with_bias, chunk):
    hidden, weight, bias, targets, upstream = _inputs(head_trained, with_bias)
    ours = TokenLogps.apply(hidden, weight, bias, targets, chunk)
    (ours * upstream).sum().backward()
    got = {"hidden": hidden.grad.clone()}
    if head_trained:
        got["weight"] = weight.grad.clone()
        if bias is not None:
            got["bias"] = bias.grad.clone()
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None

    ref = _reference(hidden, weight, bias, targets)
    (ref * upstream).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(got["hidden"], hidden.grad, atol=1e-5)
    if head_trained:
        assert torch.allclose(got["weight"], weight.grad, atol=1e-5)
        if bias is not None:
            assert torch.allclose(got["bias"], bias.grad, atol=1e-5)


def test_frozen_head_keeps_row_gradients_not_hidden():
    """With a frozen head the forward keeps one [rows, hidden] tensor of row gradients and the backward
    never touches the vocabulary again: the saved tensors are that one tensor."""
    hidden, weight, bias, targets, _ = _inputs(head_trained=False, with_bias=False)
    out = TokenLogps.apply(hidden, weight, bias, targets, 4)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == hidden.shape


def test_no_gradient_wanted_saves_nothing_extra():
    hidden, weight, _, targets, _ = _inputs(head_trained=False, with_bias=False)
    with torch.no_grad():
        out = TokenLogps.apply(hidden, weight, None, targets, 4)
    assert out.grad_fn is None
    assert torch.allclose(out, _reference(hidden, weight, None, targets), atol=1e-5)


def test_under_bf16_autocast_close_to_float32():
    """The mixed-precision case the GPU runs: matmuls in bf16, softmax in float32; both backward paths
    agree with each other and with float32 autograd to bf16 precision."""
    grads = []
    for head_trained in (False, True):
        hidden, weight, _, targets, upstream = _inputs(head_trained, with_bias=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = TokenLogps.apply(hidden, weight, None, targets, 4)
        (out * upstream).sum().backward()
        grads.append(hidden.grad.float())
    hidden, weight, _, targets, upstream = _inputs(False, with_bias=False)
    (_reference(hidden, weight, None, targets) * upstream).sum().backward()
    scale = hidden.grad.abs().max()
    for g in grads:
        assert (g - hidden.grad).abs().max() < 0.02 * scale
    assert (grads[0] - grads[1]).abs().max() < 0.02 * scale


def test_final_hidden_states_without_gradients_runs_the_decoder_alone(tiny_model):
    """No-grad passes (evaluation, the DPO reference pass) take the decoder's output instead of every
    layer's hidden states: same values as the full model's last hidden state, with the adapter on and off,
    and the full model is not called (so its output_hidden_states list never exists)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmpipeline.methods.logprobs import final_hidden_states

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    inputs = {"input_ids": torch.randint(0, 200, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for adapter_on in (True, False):
            ctx = model.disable_adapter() if not adapter_on else torch.enable_grad()
            with ctx:
                with_grad = final_hidden_states(model, inputs)
                with torch.no_grad():
                    calls.clear()
                    without = final_hidden_states(model, inputs)
                    assert not calls, "the no-grad path must not run the whole model"
                assert with_grad.requires_grad == adapter_on and not without.requires_grad
                assert torch.equal(with_grad.detach(), without)  # the same decoder kernels either way
    finally:
        hook.remove()
    with torch.no_grad():  # and the adapter changes the result, so both branches above were exercised
        on = final_hidden_states(model, inputs)
        with model.disable_adapter():
            off = final_hidden_states(model, inputs)
    assert not torch.allclose(on, off)
