"""Text metrics (rouge-score, sacrebleu, SQuAD exact match), length statistics and the loss."""

import math

import pytest
import torch

from lmpipeline.data.types import IGNORE_INDEX, TokenizedExample
from lmpipeline.evaluate import metrics as mt
from lmpipeline.evaluate.generation import Generation


def test_exact_match_normalises_like_squad():
    assert mt.normalize_answer("The  Cat!") == "cat"
    assert mt.exact_match(["The cat.", "a dog"], ["cat", "dogs"]) == 0.5


def test_rouge_and_bleu_bounds():
    assert mt.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert mt.rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    score, signature = mt.bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert score == pytest.approx(100.0) and "13a" in signature


def test_text_metrics_skip_rows_without_reference_and_count_lengths():
    gens = [Generation("4", 2, True), Generation("blue sky", 8, False), Generation("", 1, True)]
    out = mt.text_metrics(gens, ["4", None, "x"])
    assert out["num_with_reference"] == 2 and out["exact_match"] == 0.5
    assert out["truncated_fraction"] == pytest.approx(1 / 3)
    assert out["empty_fraction"] == pytest.approx(1 / 3)
    assert out["gen_tokens_max"] == 8 and out["gen_tokens_median"] == 2
    assert "rouge_l" in out and "bleu" in out
    assert "exact_match" not in mt.text_metrics(gens, [None, None, None])


def test_mean_token_loss_matches_transformers_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    a = TokenizedExample([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9])
    b = TokenizedExample([10, 11, 12], [IGNORE_INDEX, 11, 12])
    got = mt.mean_token_loss(model, [a, b], pad_id=0, batch_size=2)
    with torch.no_grad():
        # Token-weighted mean over both examples = sum of per-example sums / trained tokens.
        la = model(torch.tensor([a.input_ids]), labels=torch.tensor([a.labels])).loss * 3
        lb = model(torch.tensor([b.input_ids]), labels=torch.tensor([b.labels])).loss * 2
    assert got["eval_tokens"] == 5
    assert got["eval_loss"] == pytest.approx(float(la + lb) / 5, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
