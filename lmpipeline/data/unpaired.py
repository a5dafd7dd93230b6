"""Unpaired preference data for a kto stage: tokenised (prompt, completion, desirable?) examples, and
the micro-batches with the mismatched rows KTO's KL reference point is estimated from.

    read rows (build.load_examples)
      KTO rows (`kto` format: prompt/completion/label, or messages + label)  -> one example each
      preference pairs (any preference format, e.g. the quickstart's)        -> two examples: chosen as
          desirable, rejected as undesirable (TRL's unpair_preference_dataset); all chosen, then all rejected
      -> render with the chat template (masking.tokenize_prompt_completions: the prompt with the generation
         prompt, the completion = content + end of turn) -> over-long policy -> cache -> batch plans

Lengths, as for pairs (data/preference.py): on_overlong "truncate" keeps the prompt's LAST
max_prompt_length tokens, then the completion's first max_seq_length - len(prompt); a prompt that leaves
no room is dropped and counted; "drop" drops, "error" raises. A pair is fitted as a pair first
(tokenize_pairs), so its two examples share one prompt cut.

Batches (`make_unpaired_plans`): a micro-batch is per_device_train_batch_size examples B. Its tensors
have 2B right-padded rows (`collate_unpaired`):
    rows 0..B-1    prompt_i + completion_i                  (the examples themselves)
    rows B..2B-1   prompt_i + completion_{(i-1) mod B}      (the KL rows: each prompt with its neighbour's
                   completion, TRL's `KL_completion_ids` rotation; the KTO paper: the reference point is
                   estimated from mismatched pairs in the same micro-batch)
    input_ids, attention_mask, completion_mask  [2B, T]   as for pairs
    label                                       [B]       True: desirable
    examples                                    B
    ref_logps, ref_kl_logps                     [B]       only with precomputed reference log-probs
A micro-batch of one example has no neighbour: its KL row is the example itself (TRL refuses a batch size
of 1; the kto config does too, but the last batch of an epoch or a token-regrouped one can still be one).
With precomputed reference log-probs the KL partner is fixed instead: example i's KL completion is that of
example i-1 of the dataset (in data order), so that a reference value cached per example stays right
whatever the shuffle puts in a micro-batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.data import masking
from lmpipeline.data.build import TokenizedData, _key
from lmpipeline.data.preference import (
    TokenStore,
    build_tokenised,
    fit_lengths,
    make_item_plans,
    padded_rows,
    tokenize_pairs,
    tokenize_with_policy,
)
from lmpipeline.data.types import (
    DataReport,
    KTOExample,
    PreferenceExample,
    Source,
    TokenizedExample,
    IGNORE_INDEX,
)
from lmpipeline.errors import UserError

log = logging.getLogger(__name__)

UNPAIRED_CACHE_VERSION = 1


@dataclass
class TokenizedUnpaired:
    """One unpaired example: the prompt's tokens, the completion's tokens, and whether it is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: Source | None = None


class UnpairedData(TokenizedData):
    train: list[TokenizedUnpaired]
    eval: list[TokenizedUnpaired] | None

    def summary(self) -> str:
        desirable = sum(e.label for e in self.train)
        ev = f", {len(self.eval)} eval" if self.eval is not None else ""
        return self._summary(f"{len(self.train)} train examples ({desirable} desirable, "
                             f"{len(self.train) - desirable} undesirable){ev}")

    def describe(self) -> dict:
        desirable = sum(e.label for e in self.train)
        return self._describe({
            "train_examples": len(self.train),
            "train_desirable": desirable,
            "train_undesirable": len(self.train) - desirable,
            "eval_examples": len(self.eval) if self.eval is not None else 0,
            "train_tokens": sum(len(e.prompt_ids) + len(e.completion_ids) for e in self.train),
        })


def unpaired_as_example(item: TokenizedUnpaired) -> TokenizedExample:
    """The example as the model sees it, labels on the completion only (`data inspect`, mask checks)."""
    return TokenizedExample(list(item.prompt_ids) + list(item.completion_ids),
                            [IGNORE_INDEX] * len(item.prompt_ids) + list(item.completion_ids), item.source)


# ----------------------------------------------------------------------------------------------
# Tokenising


def fit_unpaired(item: TokenizedUnpaired, max_length: int,
                 max_prompt_length: int | None) -> tuple[TokenizedUnpaired, bool]:
    """Truncate to the limits (module docstring); (item, whether anything was cut). DataError when the
    prompt leaves no room for the completion."""
    prompt, (completion,), cut = fit_lengths(item.prompt_ids, [item.completion_ids], max_length, max_prompt_length,
                                             item.source)
    return TokenizedUnpaired(prompt, completion, item.label, item.source), cut


def tokenize_kto_example(ex: KTOExample, tokenizer, template: str) -> TokenizedUnpaired:
    prompt_ids, (completion_ids,) = masking.tokenize_prompt_completions(
        ex.prompt, {"completion": ex.completion}, tokenizer, template, source=ex.source)
    return TokenizedUnpaired(prompt_ids, completion_ids, ex.label, ex.source)


def tokenize_unpaired(examples, cfg: TrainStageConfig, tokenizer, template: str,
                      report: DataReport) -> list[TokenizedUnpaired]:
    """KTO rows, then the pairs' chosen (desirable) and then their rejected (undesirable) completions,
    with on_invalid and on_overlong applied and counted."""
    pairs = [ex for ex in examples if isinstance(ex, PreferenceExample)]
    rows = [ex for ex in examples if not isinstance(ex, PreferenceExample)]
    for ex in rows:
        if not isinstance(ex, KTOExample):
            raise UserError(f"{ex.source}: {type(ex).__name__} rows are not preference data; a kto stage needs "
                            "rows with a prompt, a completion and a label (or preference pairs)",
                            key=_key(cfg, "dataset_name_or_path"),
                            hint="give KTO rows (prompt/completion/label) or preference pairs (prompt/chosen/rejected)")
    max_prompt = getattr(cfg, "max_prompt_length", None)
    out = tokenize_with_policy(rows, cfg, report, tokenize=lambda ex: tokenize_kto_example(ex, tokenizer, template),
                               fit=lambda item: fit_unpaired(item, cfg.max_seq_length, max_prompt), what="example",
                               longest=lambda item: len(item.prompt_ids) + len(item.completion_ids))
    tokenized = tokenize_pairs(pairs, cfg, tokenizer, template, report) if pairs else []
    out += [TokenizedUnpaired(p.prompt_ids, p.chosen_ids, True, p.source) for p in tokenized]
    out += [TokenizedUnpaired(p.prompt_ids, p.rejected_ids, False, p.source) for p in tokenized]
    return out


def _pack(items: list[TokenizedUnpaired], prefix: str) -> dict:
    out = {f"{prefix}_label": np.asarray([e.label for e in items], dtype=np.bool_)}
    for part in ("prompt", "completion"):
        seqs = [getattr(e, f"{part}_ids") for e in items]
        out[f"{prefix}_{part}_ids"] = np.asarray([t for s in seqs for t in s], dtype=np.int64)
        out[f"{prefix}_{part}_lengths"] = np.asarray([len(s) for s in seqs], dtype=np.int64)
    return out


def _unpack(arrays, prefix: str, sources: list) -> list[TokenizedUnpaired]:
    parts = {}
    for part in ("prompt", "completion"):
        ids, lengths = arrays[f"{prefix}_{part}_ids"], arrays[f"{prefix}_{part}_lengths"]
        ends = np.cumsum(lengths)
        parts[part] = [ids[e - n:e].tolist() for n, e in zip(lengths.tolist(), ends.tolist())]
    return [TokenizedUnpaired(pr, co, bool(lb), Source(*src) if src else None)
            for pr, co, lb, src in zip(parts["prompt"], parts["completion"], arrays[f"{prefix}_label"].tolist(),
                                       sources)]


UNPAIRED_STORE = TokenStore(".unpaired", UNPAIRED_CACHE_VERSION, _pack, _unpack, "tokenised-unpaired-examples")


def build_unpaired_data(cfg: TrainStageConfig, tokenizer) -> UnpairedData:
    """Tokenised train (and eval) unpaired examples for `cfg`, from the cache when the same inputs were seen."""
    return build_tokenised(cfg, tokenizer, tokenize=tokenize_unpaired, store=UNPAIRED_STORE, data_class=UnpairedData,
                           noun="examples")


def unpaired_digest(items: list[TokenizedUnpaired] | None) -> str:
    """sha256 of the examples' tokens and labels, in order (what reference log-probs are computed on)."""
    h = hashlib.sha256()
    for e in items or []:
        for ids in (e.prompt_ids, e.completion_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b"1\n" if e.label else b"0\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Batches


def rotated_partners(n: int) -> list[int]:
    """KL partner of each of n examples in a micro-batch: the one before it, the first taking the last's
    (TRL's `[completions[-1]] + completions[:-1]`)."""
    return [(i - 1) % n for i in range(n)]


def collate_unpaired(items: list[TokenizedUnpaired], pad_token_id: int, kl_completions: list[list[int]] | None = None,
                     ref: np.ndarray | None = None) -> dict:
    """The micro-batch layout of the module docstring. `kl_completions[i]` is the completion the KL row of
    item i pairs with its prompt (default: the rotation within the batch); `ref` is [B, 2] reference
    log-probs (row, KL row)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    if kl_completions is None:
        kl_completions = [items[j].completion_ids for j in rotated_partners(len(items))]
    rows = [(e.prompt_ids, e.completion_ids) for e in items] + [(e.prompt_ids, c) for e, c in zip(items, kl_completions)]
    batch = dict(padded_rows(rows, pad_token_id), label=torch.tensor([e.label for e in items], dtype=torch.bool),
                 examples=len(items))
    if ref is not None:
        batch["ref_logps"] = torch.as_tensor(ref[:, 0], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.as_tensor(ref[:, 1], dtype=torch.float32)
    return batch


def unpaired_collator(tokenizer, *, fixed_partners: bool = False):
    """collate(items, idx, ref) -> batch of items[idx] (make_item_plans' contract). `fixed_partners`: the KL
    completion of item i is item i-1's in data order (precomputed references, module docstring)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(items, idx, ref=None):
        chosen = [items[i] for i in idx]
        kl = [items[(i - 1) % len(items)].completion_ids for i in idx] if fixed_partners else None
        return collate_unpaired(chosen, pad_id, kl, ref)

    return collate


def make_unpaired_plans(cfg: TrainStageConfig, data: UnpairedData, tokenizer, rank: int = 0, world: int = 1, *,
                        ref_train: np.ndarray | None = None, ref_eval: np.ndarray | None = None):
    """(train_plan, eval_plan) of unpaired micro-batches (module docstring); `ref_train` / `ref_eval`
    ([examples, 2], data order, computed with fixed partners) add precomputed reference log-probs."""
    collate = unpaired_collator(tokenizer, fixed_partners=ref_train is not None or ref_eval is not None)
    # A padded example takes two rows (itself and its KL row) of about its own width.
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in data.train]
    return make_item_plans(cfg, data.train, data.eval, collate, lengths=lengths, padded=True, rows_per_item=2,
                           noun="example", rank=rank, world=world, ref_train=ref_train, ref_eval=ref_eval)


__all__ = ["TokenizedUnpaired", "UnpairedData", "build_unpaired_data", "tokenize_unpaired", "tokenize_kto_example",
           "fit_unpaired", "collate_unpaired", "unpaired_collator", "make_unpaired_plans", "rotated_partners",
           "unpaired_as_example", "unpaired_digest", "UNPAIRED_STORE"]
