"""Sampling on the device: the processed distribution, the draw, the counter-based randomness."""

import math

import pytest
import torch

from lmpipeline.generation import sampling
from lmpipeline.generation.params import SamplingParams


def _rows(b, **kw):
    t = torch.full((b,), kw.get("temperature", 1.0))
    k = torch.full((b,), kw.get("top_k", 0), dtype=torch.long)
    p = torch.full((b,), kw.get("top_p", 1.0))
    return t, k, p


def test_filters_match_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    t, k, p = _rows(6, temperature=0.7, top_k=10, top_p=0.8)
    ours, order = sampling.processed_logits(logits, t, k, p, sampling.FILTER)
    back = torch.empty_like(ours).scatter_(-1, order, ours)
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())))
    assert torch.equal(torch.isinf(back), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    # Same float32 division on both sides: equal to the last bit.
    assert torch.equal(back[kept], ref[kept])


def test_draws_follow_the_distribution():
    # 20,000 draws of a 4-token distribution: each frequency within 4 standard errors of its probability.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()
    t, k, p = _rows(n)
    u = sampling.uniform(torch.full((n,), 3), torch.arange(n), torch.zeros(n, dtype=torch.long))
    tok, lp = sampling.choose(logits, t, k, p, u, sampling.SAMPLE)
    freq = torch.bincount(tok, minlength=4).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((freq - probs.double()).abs() < 4 * se)
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)


def test_top_k_one_and_temperature_zero_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(5, 30)
    u = torch.rand(5, dtype=torch.float64)
    t, k, p = _rows(5, top_k=1)
    tok, lp = sampling.choose(logits, t, k, p, u, sampling.FILTER)
    assert torch.equal(tok, logits.argmax(-1)) and torch.allclose(lp, torch.zeros(5))
    t0, _, _ = _rows(5, temperature=0.0)
    tok0, lp0 = sampling.choose(logits, t0, k, p, u, sampling.SAMPLE)
    assert torch.equal(tok0, logits.argmax(-1))
    assert torch.allclose(lp0, torch.log_softmax(logits, -1).max(-1).values)


def test_uniforms_depend_on_seed_sample_and_position_only():
    seed = torch.tensor([1, 1, 2, 1])
    sample = torch.tensor([0, 1, 0, 0])
    pos = torch.tensor([5, 5, 5, 6])
    u = sampling.uniform(seed, sample, pos)
    assert len(set(u.tolist())) == 4 and bool(((u > 0) & (u < 1)).all())
    assert sampling.uniform(seed[[2, 0]], sample[[2, 0]], pos[[2, 0]]).tolist() == u[[2, 0]].tolist()
    many = sampling.uniform(torch.zeros(10000, dtype=torch.long), torch.zeros(10000, dtype=torch.long),
                            torch.arange(10000))
    assert abs(float(many.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 10000)


def test_batch_mode_picks_the_cheapest_path():
    assert sampling.batch_mode([SamplingParams(), SamplingParams(top_k=5)]) == sampling.GREEDY
    assert sampling.batch_mode([SamplingParams(), SamplingParams(temperature=1.0)]) == sampling.SAMPLE
    assert sampling.batch_mode([SamplingParams(temperature=1.0, top_p=0.9)]) == sampling.FILTER


def test_invalid_settings_are_reported_together():
    from lmpipeline.errors import UserError

    with pytest.raises(UserError) as e:
        SamplingParams(temperature=-1, top_p=0, n=0)
    assert "temperature" in str(e.value) and "top_p" in str(e.value) and "n (samples" in str(e.value)
