"""gradient_checkpointing_fraction: some decoder layers checkpointed, the same gradients, memory and time
planned between none and all."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmpipeline.config.presets import load_shipped
from lmpipeline.models.loading import checkpointed_layer_indices, enable_gradient_checkpointing
from lmpipeline.plan import estimate as est
from lmpipeline.plan import hardware, timing


@pytest.mark.parametrize("n,fraction,expected", [
    (28, 1.0, list(range(28))),
    (28, 0.25, [0, 4, 8, 12, 16, 20, 24]),
    (28, 0.5, list(range(0, 28, 2))),
    (4, 0.3, [0, 2]),
    (3, 0.01, [0]),  # at least one layer when checkpointing is on
])
def test_layers_are_spread_evenly(n, fraction, expected):
    assert checkpointed_layer_indices(n, fraction) == expected


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64)
    return LlamaForCausalLM(cfg).float()


def _grads(model, ids):
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_half_the_layers_checkpointed_same_gradients_fewer_saved_tensors():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = _grads(_model(), ids)

    model = _model()
    assert enable_gradient_checkpointing(model, 0.5) == 2
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == [True, False, True, False]
    partial = _grads(model, ids)
    for name, g in plain.items():
        # A checkpointed layer reruns its forward with the same kernels on the same inputs, and the
        # gradients meet in the same order: nothing rounds differently, so they are bitwise the same.
        assert torch.equal(g, partial[name]), name

    # Checkpointed layers keep only their input: fewer tensors saved for backward than with none.
    def saved_count(m):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids, use_cache=False).loss
        return count

    none, half, full = _model(), _model(), _model()
    enable_gradient_checkpointing(full, 1.0)
    enable_gradient_checkpointing(half, 0.5)
    for m in (none, half, full):
        m.train()
    assert saved_count(none) > saved_count(half) > saved_count(full)


def test_estimate_and_time_lie_between_none_and_full():
    arch = load_shipped("llama-3.2-3b")
    base = est.Setup(micro_batch=4, seq_len=2048, packing=True, attn="varlen", optim="adamw_8bit")
    peaks, times = [], []
    for gc, fraction in ((False, 1.0), (True, 0.25), (True, 0.5), (True, 1.0)):
        setup = est.replace(base, gradient_checkpointing=gc, checkpoint_fraction=fraction)
        peaks.append(est.estimate_memory(arch, setup).peak)
        times.append(timing.estimate_time(arch, setup, hardware.gpu("h100")).flops_per_token)
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
    assert times[0] < times[1] < times[2] < times[3]
    # a quarter of the layers checkpointed saves about a quarter of what checkpointing all of them saves
    assert abs((peaks[0] - peaks[1]) / (peaks[0] - peaks[3]) - 0.25) < 0.05
