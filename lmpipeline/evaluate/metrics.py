"""Numbers for generated text and for held-out loss.

Reference metrics (rows without a reference are left out of them, and counted):
    exact_match  share of outputs equal to the reference after SQuAD v1.1 answer normalisation
                 (lower case, punctuation and the articles a/an/the removed, whitespace collapsed;
                 Rajpurkar et al. 2016, the official evaluate-v1.1.py `normalize_answer`)
    rouge_l      mean ROUGE-L F1 (Lin 2004) from Google's `rouge-score` package, Porter stemming on.
                 Its tokenizer keeps only [a-z0-9] runs, so text in non-Latin scripts scores 0: use
                 bleu there.
    bleu         corpus BLEU (Papineni et al. 2002) from `sacrebleu` with its default 13a tokenizer,
                 0-100, the signature stored beside the score
Length statistics (every row): generated tokens mean/median/p90/max, share cut at max_new_tokens,
share of empty outputs, characters mean.

Loss (`mean_token_loss`): cross-entropy summed over trained positions (labels != -100, shifted by one
as the model predicts the next token) and divided by their count over the whole set, so long and
short examples weigh by their tokens, as in training; perplexity = exp(loss).
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

from lmpipeline.evaluate.generation import Generation, percentile

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not predictions:
        return math.nan
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    if not predictions:
        return math.nan
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """(corpus BLEU 0-100, sacrebleu signature)."""
    import sacrebleu

    if not predictions:
        return math.nan, ""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(predictions), [list(references)])
    return float(score.score), str(metric.get_signature())


def length_stats(generations: Sequence[Generation]) -> dict:
    tokens = [g.num_tokens for g in generations]
    n = max(len(generations), 1)
    return {
        "gen_tokens_mean": sum(tokens) / n if tokens else math.nan,
        "gen_tokens_median": percentile(tokens, 0.5),
        "gen_tokens_p90": percentile(tokens, 0.9),
        "gen_tokens_max": max(tokens) if tokens else 0,
        "truncated_fraction": sum(not g.finished for g in generations) / n,
        "empty_fraction": sum(not g.text.strip() for g in generations) / n,
        "chars_mean": sum(len(g.text) for g in generations) / n,
    }


def text_metrics(generations: Sequence[Generation], references: Sequence[str | None],
                 names: Sequence[str] = ("exact_match", "rouge_l", "bleu")) -> dict:
    """Reference metrics over rows that have a reference, plus length statistics over all rows."""
    pairs = [(g.text, r) for g, r in zip(generations, references) if r is not None]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    out: dict = {"num_prompts": len(generations), "num_with_reference": len(pairs)}
    if pairs:
        if "exact_match" in names:
            out["exact_match"] = exact_match(preds, refs)
        if "rouge_l" in names:
            out["rouge_l"] = rouge_l(preds, refs)
        if "bleu" in names:
            out["bleu"], out["bleu_signature"] = bleu(preds, refs)
    out.update(length_stats(generations))
    return out


def mean_token_loss(model, examples, *, pad_id: int, batch_size: int = 8) -> dict:
    """{"eval_loss", "eval_perplexity", "eval_tokens"} over TokenizedExample-like objects."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    # Longest first: the first batch shows an out-of-memory at once, not after minutes.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[s:s + batch_size]]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                n = len(e.input_ids)
                ids[row, :n] = torch.tensor(e.input_ids)
                labels[row, :n] = torch.tensor(e.labels)
                mask[row, :n] = 1
            # Only positions that predict a trained token need logits (prompts are most of a chat row):
            # logits_to_keep with indices skips the LM head elsewhere, a vocabulary-sized saving.
            keep = torch.nonzero((labels[:, 1:] != -100).any(dim=0)).flatten()
            if keep.numel() == 0:
                continue
            targets = labels[:, keep + 1].to(device)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            try:
                logits = model(**inputs, logits_to_keep=keep.to(device)).logits
            except TypeError:  # an architecture without logits_to_keep: full logits, then select
                logits = model(**inputs).logits[:, keep]
            for row in range(len(batch)):  # fp32 one row at a time bounds the memory of the upcast
                total += float(F.cross_entropy(logits[row].float(), targets[row], ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    if count == 0:
        return {"eval_loss": math.nan, "eval_perplexity": math.nan, "eval_tokens": 0}
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}
