"""Preference data for a dpo stage: tokenised pairs, and the micro-batches the training loop consumes.

    read rows (build.load_examples: any preference format -> PreferenceExample)
      -> render with the chat template, split prompt / chosen / rejected (masking.tokenize_preference)
      -> over-long policy (on_overlong, max_seq_length, max_prompt_length) -> cache -> batch plans

Supported: every preference format the data layer reads (preference, hh_rlhf, ultrafeedback,
ultrafeedback_binarized, sharegpt_preference, preference_messages), with several sources mixed,
and an eval set from eval_dataset_name_or_path or validation_split_ratio.

Lengths: a pair's longest sequence is prompt + max(chosen, rejected). With on_overlong "truncate"
the prompt keeps its LAST max_prompt_length tokens (when set), then each completion keeps its first
max_seq_length - len(prompt) tokens (the same rule as masking.tokenize_preference and TRL's
keep_start on the completion). A pair whose prompt alone leaves no room, or whose two completions
become identical after truncation, is dropped and counted; "drop" drops over-long pairs; "error"
raises. Every count ends in PreferenceData.report and in run.json.

Batches (`make_pair_plans`): a micro-batch is per_device_train_batch_size PAIRS. Its tensors are
2 x pairs rows, chosen rows first then rejected rows (TRL's layout), right-padded:
    input_ids        [2B, T]   prompt + completion, pad_token_id after the end
    attention_mask   [2B, T]   1 on real tokens
    completion_mask  [2B, T]   1 on completion tokens only (the prompt never counts)
    ref_chosen_logps, ref_rejected_logps [B]   only when reference log-probs were precomputed
Where varlen attention runs (models/attention.py) the micro-batch is one row with no padding
(`pair_layout` chooses; `pair_collator` collates):
  "shared" (default, share_prompt: true; `collate_pairs_shared`): per pair one run
    [prompt, chosen, rejected]; chosen attends to the prompt and itself, rejected to the prompt and
    itself (never to chosen), with positions continuing from the prompt's end. The prompt goes through
    the model once per pair instead of twice: on the bench's DPO workload (prompt 185, replies 247
    tokens on average) 21% fewer tokens per pair, 19% less step time (bench/README.md).
  "packed" (share_prompt: false; `collate_pairs_packed`): the 2 x pairs sequences end to end, each
    attending only to itself.
  Both carry input_ids, position_ids [1, T], cu_seq_lens (query segments), max_length, pairs, and the
  scored tokens: score_from (the position whose hidden state predicts), score_target (the token),
  score_sequence (chosen i -> i, rejected i -> pairs + i); "shared" adds cu_seq_lens_k, max_length_k
  and kv_gather (key segments, models/attention.py). Log-probs are those of the padded layout
  (tests/integration/test_dpo.py::test_packed_layouts_give_the_padded_logps_and_gradients).
The order is a deterministic shuffle of pairs per epoch (seed + epoch), as for SFT.

Raised: UserError (with the config key) for non-preference data, no usable pairs, an over-long pair
under on_overlong: error, and any invalid row under on_invalid: error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lmpipeline.config.schema import DPOConfig, TrainStageConfig, token_budget
from lmpipeline.data import cache, masking, validate
from lmpipeline.data.build import TokenizedData, _key, chat_template_for, load_examples
from lmpipeline.data.packing import regroup_by_tokens
from lmpipeline.data.types import (
    IGNORE_INDEX,
    DataError,
    DataReport,
    PreferenceExample,
    Source,
    TokenizedExample,
    TokenizedPair,
    stage_for_rows,
)
from lmpipeline.errors import UserError
from lmpipeline.models.compile import shaped_for_layers
from lmpipeline.data.batch_plan import BatchPlan

log = logging.getLogger(__name__)

PAIR_CACHE_VERSION = 1


class PreferenceData(TokenizedData):
    train: list[TokenizedPair]
    eval: list[TokenizedPair] | None

    def summary(self) -> str:
        ev = f", {len(self.eval)} eval" if self.eval is not None else ""
        return self._summary(f"{len(self.train)} train pairs{ev} ({pair_tokens(self.train):,} tokens)")

    def describe(self) -> dict:
        return self._describe({
            "train_pairs": len(self.train),
            "eval_pairs": len(self.eval) if self.eval is not None else 0,
            "train_tokens": pair_tokens(self.train),
        })


def pair_tokens(pairs: list[TokenizedPair]) -> int:
    """Tokens of these pairs as two sequences each (the prompt twice, each completion once): what the
    data report shows. What a micro-batch really runs depends on its layout: layout_tokens."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def pair_as_example(pair: TokenizedPair, which: str) -> TokenizedExample:
    """One side of a pair as the model sees it: prompt + completion, labels only on the completion
    (for `lmpipeline data inspect` and masking checks)."""
    if which not in ("chosen", "rejected"):
        raise ValueError(f"which must be 'chosen' or 'rejected', got {which!r}")
    completion = pair.chosen_ids if which == "chosen" else pair.rejected_ids
    ids = list(pair.prompt_ids) + list(completion)
    labels = [IGNORE_INDEX] * len(pair.prompt_ids) + list(completion)
    return TokenizedExample(ids, labels, pair.source)


# ----------------------------------------------------------------------------------------------
# Tokenising


def fit_pair(pair: TokenizedPair, max_length: int, max_prompt_length: int | None) -> tuple[TokenizedPair, bool]:
    """Truncate a pair to the limits (module docstring); returns (pair, whether anything was cut).
    Raises DataError when the prompt leaves no room for the completions."""
    prompt, (chosen, rejected), cut = fit_lengths(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids], max_length,
                                                  max_prompt_length, pair.source)
    return TokenizedPair(prompt, chosen, rejected, pair.source, pair.margin), cut


def fit_lengths(prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None,
                source=None) -> tuple[list[int], list[list[int]], bool]:
    """(prompt, completions, whether anything was cut) within the limits: the prompt keeps its last
    max_prompt_length tokens, each completion its first max_length - len(prompt). DataError (with `source`)
    when the prompt leaves no room."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[len(prompt) - max_prompt_length:], True
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(f"the prompt is {len(prompt)} tokens, leaving no room for the completions within "
                        f"max_seq_length={max_length}; set max_prompt_length below max_seq_length", source)
    if any(len(c) > room for c in completions):
        completions, cut = [c[:room] for c in completions], True
    return prompt, completions, cut


def tokenize_pairs(examples, cfg: TrainStageConfig, tokenizer, template: str, report: DataReport) -> list[TokenizedPair]:
    """Tokenise every example, apply on_overlong and count what it touched."""
    for ex in examples:
        if not isinstance(ex, PreferenceExample):
            raise UserError(f"{ex.source}: {type(ex).__name__} rows are not preference pairs; this stage needs "
                            "rows with a prompt and chosen/rejected replies", key=_key(cfg, "dataset_name_or_path"),
                            hint=f"give preference data (e.g. prompt/chosen/rejected), or train these rows in "
                                 f"{stage_for_rows(ex)}")

    def tokenize(ex: PreferenceExample) -> TokenizedPair:
        pair = masking.tokenize_preference(ex, tokenizer, template)
        if ex.score_chosen is not None and ex.score_rejected is not None:
            pair.margin = float(ex.score_chosen) - float(ex.score_rejected)
        return pair

    def fit(pair: TokenizedPair) -> tuple[TokenizedPair, bool]:
        pair, cut = fit_pair(pair, cfg.max_seq_length, getattr(cfg, "max_prompt_length", None))
        if pair.chosen_ids == pair.rejected_ids:
            raise DataError("chosen and rejected are identical after truncation to "
                            f"{len(pair.chosen_ids)} completion tokens", pair.source)
        return pair, cut

    return tokenize_with_policy(examples, cfg, report, tokenize=tokenize, fit=fit, what="pair",
                                longest=lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))


def tokenize_with_policy(examples, cfg: TrainStageConfig, report: DataReport, *, tokenize: Callable, fit: Callable,
                         longest: Callable, what: str) -> list:
    """`tokenize(example)` each example (DataError: unusable, under on_invalid), then on_overlong against
    max_seq_length by `longest(item)`, then `fit(item) -> (item, cut)` (DataError: cut to nothing usable,
    counted as dropped for length); every outcome is counted in `report`. Items carry prompt_ids."""
    out = []
    for ex in examples:
        try:
            item = tokenize(ex)
        except DataError as e:
            e = e if e.source is not None else DataError(e.reason, ex.source, e.key)
            if cfg.on_invalid == "error":
                raise UserError(str(e), key=_key(cfg, "dataset_name_or_path"), hint="fix the row, or set "
                                "on_invalid: skip to drop such rows (they are counted)") from None
            report.issues.append(e)
            report.skipped_invalid += 1
            continue
        tokens = longest(item)
        if tokens > cfg.max_seq_length and cfg.on_overlong == "error":
            raise UserError(f"{ex.source}: {what} is {tokens} tokens (prompt {len(item.prompt_ids)}), over "
                            f"max_seq_length={cfg.max_seq_length}", key=_key(cfg, "on_overlong"),
                            hint="raise max_seq_length, or use on_overlong: truncate|drop")
        if tokens > cfg.max_seq_length and cfg.on_overlong == "drop":
            report.dropped_overlong += 1
            continue
        try:
            item, cut = fit(item)
        except DataError as e:  # cut to nothing usable by the length limits: counted as dropped for length
            report.issues.append(e if e.source is not None else DataError(e.reason, ex.source, e.key))
            report.dropped_overlong += 1
            continue
        report.truncated += int(cut)
        out.append(item)
    return out


def build_preference_data(cfg: TrainStageConfig, tokenizer) -> PreferenceData:
    """Tokenised train (and eval) pairs for `cfg`, from the cache when the same inputs were seen."""
    return build_tokenised(cfg, tokenizer, tokenize=tokenize_pairs, store=PAIR_STORE, data_class=PreferenceData,
                           noun="pairs")


@dataclass(frozen=True)
class TokenStore:
    """How one kind of tokenised item is cached (data/cache.py's entries): its file suffix, its version
    and how a list of items becomes arrays and back."""

    suffix: str
    version: int
    pack: Callable
    unpack: Callable
    what: str


def build_tokenised(cfg: TrainStageConfig, tokenizer, *, tokenize: Callable, store: TokenStore, data_class,
                    noun: str):
    """read rows -> template -> `tokenize(examples, cfg, tokenizer, template, report)` -> cache, for train
    and eval: what preference pairs and unpaired (KTO) examples share. `data_class` takes (train, eval,
    report, formats, fingerprint, cache_hit, chat_template, warnings)."""
    parts = dict(cache.fingerprint_inputs(cfg, tokenizer), **{store.suffix.strip("."): store.version})
    cached = cache.load_entry(parts, unpack=store.unpack, suffix=store.suffix, what=store.what.replace("-", " "))
    if cached is not None:
        train, eval_, meta = cached
        if meta.get("chat_template"):
            tokenizer.chat_template = meta["chat_template"]
        return data_class(train, eval_, DataReport(**meta["report"]), meta["formats"], meta["fingerprint"], True,
                          meta.get("chat_template"), meta.get("warnings", []))
    try:
        examples, eval_examples, report, fmts = load_examples(cfg)
    except DataError as e:
        raise UserError(str(e), key=_key(cfg, "dataset_name_or_path"),
                        hint="fix the rows, or set on_invalid: skip to drop them (they are counted)") from None
    template = chat_template_for(cfg, tokenizer)
    train = tokenize(examples, cfg, tokenizer, template, report)
    eval_ = tokenize(eval_examples, cfg, tokenizer, template, report) if eval_examples else None
    if not train:
        what = "preference pairs" if noun == "pairs" else noun
        if report.dropped_overlong and report.dropped_overlong >= report.total_rows - report.skipped_invalid:
            # Every row was too long: the limits are the fix, not the data file.
            raise UserError(f"every one of the {report.dropped_overlong} {what} is longer than max_seq_length="
                            f"{cfg.max_seq_length} allows ({report.summary()})", key=_key(cfg, "max_prompt_length"),
                            hint=f"set max_prompt_length (e.g. {max(1, cfg.max_seq_length // 2)}) so long prompts are "
                                 "cut from the left, raise max_seq_length, or use on_overlong: truncate")
        raise UserError(f"no usable {what} after tokenisation ({report.summary()})", key=_key(cfg, "dataset_name_or_path"))
    report.kept = len(train)
    warnings = []
    if report.dropped_overlong:
        warnings.append(f"{report.dropped_overlong} {noun} dropped for length (max_seq_length={cfg.max_seq_length}, "
                        f"max_prompt_length={getattr(cfg, 'max_prompt_length', None)})")
    for w in warnings:
        log.warning(w)
    # The saved tokenizer must carry the template the model was trained with.
    tokenizer.chat_template = template
    fingerprint = cache.save_entry(parts, train, eval_, {
        "report": {k: getattr(report, k)
                   for k in ("total_rows", "kept", "skipped_invalid", "truncated", "dropped_overlong")},
        "formats": fmts, "chat_template": template, "warnings": warnings,
    }, pack=store.pack, suffix=store.suffix, what=store.what)
    if report.issues:
        log.warning("%d rows were skipped or changed; first ones:\n%s", len(report.issues),
                    validate.format_report(report, max_issues=5))
    return data_class(train, eval_, report, fmts, fingerprint, False, template, warnings)


def pairs_digest(pairs: list[TokenizedPair] | None) -> str:
    """sha256 of the token ids of `pairs`, in order (what reference log-probs are computed on)."""
    h = hashlib.sha256()
    for p in pairs or []:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Cache: same key function and folder as the SFT token cache (data/cache.py), one .npz per entry.


def _pack(pairs: list[TokenizedPair], prefix: str) -> dict:
    out = {}
    for part in ("prompt", "chosen", "rejected"):
        seqs = [getattr(p, f"{part}_ids") for p in pairs]
        out[f"{prefix}_{part}_ids"] = np.asarray([t for s in seqs for t in s], dtype=np.int64)
        out[f"{prefix}_{part}_lengths"] = np.asarray([len(s) for s in seqs], dtype=np.int64)
    out[f"{prefix}_margin"] = np.asarray([np.nan if p.margin is None else p.margin for p in pairs], dtype=np.float64)
    return out


def _unpack(arrays, prefix: str, sources: list) -> list[TokenizedPair]:
    parts = {}
    for part in ("prompt", "chosen", "rejected"):
        ids, lengths = arrays[f"{prefix}_{part}_ids"], arrays[f"{prefix}_{part}_lengths"]
        ends = np.cumsum(lengths)
        parts[part] = [ids[e - n:e].tolist() for n, e in zip(lengths.tolist(), ends.tolist())]
    # Entries written before margins were kept have none.
    margins = arrays[f"{prefix}_margin"].tolist() if f"{prefix}_margin" in arrays else [np.nan] * len(sources)
    return [TokenizedPair(pr, ch, rj, Source(*src) if src else None, None if np.isnan(m) else m)
            for pr, ch, rj, src, m in zip(parts["prompt"], parts["chosen"], parts["rejected"], sources, margins)]


PAIR_STORE = TokenStore(".pairs", PAIR_CACHE_VERSION, _pack, _unpack, "tokenised-pairs")


# ----------------------------------------------------------------------------------------------
# Batches


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, ref: np.ndarray | None = None) -> dict:
    """The micro-batch layout of the module docstring; `ref` is [pairs, 2] reference log-probs."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return _with_reference(dict(padded_rows(rows, pad_token_id), pairs=len(pairs)), ref)


def padded_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """input_ids, attention_mask, completion_mask [rows, T] of (prompt, completion) token lists, right-padded:
    the padded layout every preference-like batch shares."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(prompt) + len(completion)
        input_ids[r, :m] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[r, :m] = 1
        completion_mask[r, n:m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_pairs_packed(pairs: list[TokenizedPair], ref: np.ndarray | None = None) -> dict:
    """The packed layout of the module docstring: chosen sequences, then rejected, in one row."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    row = _ScoredRow()
    for r, (prompt, answer) in enumerate(rows):
        start = row.add(prompt)
        row.add(answer, scored_as=r, after=start + len(prompt) - 1 if prompt else None)
        row.cut()
    return _with_reference(row.batch(len(pairs)), ref)


def collate_pairs_shared(pairs: list[TokenizedPair], ref: np.ndarray | None = None) -> dict:
    """The shared-prompt layout of the module docstring: per pair one run [prompt, chosen, rejected].

    Query segments: prompt+chosen, then rejected (cu_seq_lens). Key segments: prompt+chosen, then
    prompt+rejected (cu_seq_lens_k), read from the row at `kv_gather`; models/attention.py aligns a
    segment's causality to its end, so a rejected token sees the prompt and the rejected tokens before
    it. Rejected positions continue from the prompt's end, so the rejected sequence has the positions
    (and log-probs) it has on its own. The first reply token of both sequences is scored from the one
    hidden state of the prompt's last token."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    n = len(pairs)
    row = _ScoredRow()
    gather: list[int] = []
    cu_k = [0]
    for i, p in enumerate(pairs):
        start = row.add(p.prompt_ids)
        last_prompt = start + len(p.prompt_ids) - 1 if p.prompt_ids else None
        row.add(p.chosen_ids, scored_as=i, after=last_prompt)
        row.cut()
        reply = row.add(p.rejected_ids, scored_as=n + i, after=last_prompt, positions_from=len(p.prompt_ids))
        row.cut()
        gather.extend(range(start, start + len(p.prompt_ids) + len(p.chosen_ids)))
        cu_k.append(len(gather))
        gather.extend(range(start, start + len(p.prompt_ids)))
        gather.extend(range(reply, reply + len(p.rejected_ids)))
        cu_k.append(len(gather))
    batch = row.batch(n)
    batch.update(cu_seq_lens_k=torch.tensor(cu_k, dtype=torch.int32),
                 max_length_k=max(b - a for a, b in zip(cu_k[:-1], cu_k[1:])),
                 kv_gather=torch.tensor(gather, dtype=torch.long))
    return _with_reference(batch, ref)


class _ScoredRow:
    """Builds one packed row: token ids, positions, query segments, and the scored tokens (which
    position predicts which token, for which sequence): the packed layouts' common part."""

    def __init__(self):
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.cu = [0]
        self.score_from: list[int] = []
        self.score_target: list[int] = []
        self.score_sequence: list[int] = []

    def add(self, tokens, *, scored_as: int | None = None, after: int | None = None,
            positions_from: int | None = None) -> int:
        """Append `tokens` to the current segment; returns where they start. `scored_as`: score each token,
        the first from position `after` (None: the first is not scored), the others from the token before.
        `positions_from`: their first position id (default: continue the segment's)."""
        start = len(self.ids)
        first = positions_from if positions_from is not None else start - self.cu[-1]
        self.ids.extend(tokens)
        self.positions.extend(range(first, first + len(tokens)))
        if scored_as is not None:
            for j, token in enumerate(tokens):
                source = after if j == 0 else start + j - 1
                if source is not None:
                    self.score_from.append(source)
                    self.score_target.append(token)
                    self.score_sequence.append(scored_as)
        return start

    def cut(self) -> None:
        """End the current segment (attention does not cross it)."""
        self.cu.append(len(self.ids))

    def batch(self, pairs: int) -> dict:
        return {
            "input_ids": torch.tensor([self.ids], dtype=torch.long),
            "position_ids": torch.tensor([self.positions], dtype=torch.long),
            "cu_seq_lens": torch.tensor(self.cu, dtype=torch.int32),
            "max_length": max(b - a for a, b in zip(self.cu[:-1], self.cu[1:])),
            "score_from": torch.tensor(self.score_from, dtype=torch.long),
            "score_target": torch.tensor(self.score_target, dtype=torch.long),
            "score_sequence": torch.tensor(self.score_sequence, dtype=torch.long),
            "pairs": pairs,
        }


def _with_reference(batch: dict, ref: np.ndarray | None) -> dict:
    if ref is not None:
        batch["ref_chosen_logps"] = torch.as_tensor(ref[:, 0], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.as_tensor(ref[:, 1], dtype=torch.float32)
    return batch


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# How a micro-batch of pairs is laid out (module docstring), as the DPO stage logs it.
PAIR_LAYOUTS = {
    "padded": "chosen and rejected as right-padded rows (SDPA)",
    "packed": "sequences end to end in one row, the prompt once per sequence (varlen attention)",
    "shared": "sequences end to end in one row, each pair's prompt once for both replies (varlen attention)",
}


def pair_layout(cfg: DPOConfig, *, packed: bool) -> str:
    """The layout a run uses: padded without varlen attention; packed rows share the prompt unless
    share_prompt is off."""
    if not packed:
        return "padded"
    return "shared" if cfg.share_prompt else "packed"


def layout_tokens(pair: TokenizedPair, layout: str) -> int:
    """Tokens this pair adds to a micro-batch as `layout` collates it (padded: two rows as wide as its
    longer sequence)."""
    prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if layout == "shared":
        return prompt + chosen + rejected
    if layout == "packed":
        return 2 * prompt + chosen + rejected
    return 2 * (prompt + max(chosen, rejected))


def pair_collator(cfg: DPOConfig, tokenizer, layout: str):
    """collate(pairs, ref) -> batch for `layout`; training, evaluation and the reference pass share it,
    so precomputed reference log-probs come from the layout the policy is trained on."""
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(PAIR_LAYOUTS)}, got {layout!r}")
    if layout == "padded":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return lambda pairs, ref=None: collate_pairs(pairs, pad_id, ref)
    collate_packed = collate_pairs_shared if layout == "shared" else collate_pairs_packed

    return lambda pairs, ref=None: shaped_for_layers(collate_packed(pairs, ref), cfg)


def make_pair_plans(cfg: DPOConfig, data: PreferenceData, tokenizer, rank: int = 0, world: int = 1, *,
                    ref_train: np.ndarray | None = None, ref_eval: np.ndarray | None = None,
                    layout: str = "padded"):
    """(train_plan, eval_plan): deterministic micro-batches of pairs; eval batches split by rank.
    `ref_train` / `ref_eval` ([pairs, 2] arrays, pair order) add precomputed reference log-probs;
    `layout` is one of PAIR_LAYOUTS (pair_layout chooses it)."""
    layout_batch = pair_collator(cfg, tokenizer, layout)
    padded = layout == "padded"
    # regroup_by_tokens counts a padded pair as rows_per_item rows of its width.
    lengths = [layout_tokens(p, layout) // (2 if padded else 1) for p in data.train]
    return make_item_plans(cfg, data.train, data.eval, lambda items, idx, ref: layout_batch([items[i] for i in idx], ref),
                           lengths=lengths, padded=padded, rows_per_item=2, noun="pair", rank=rank, world=world,
                           ref_train=ref_train, ref_eval=ref_eval)


def make_item_plans(cfg: TrainStageConfig, train: list, eval_: list | None, collate: Callable, *, lengths: list[int],
                    padded: bool, rows_per_item: int, noun: str, rank: int = 0, world: int = 1,
                    ref_train: np.ndarray | None = None, ref_eval: np.ndarray | None = None):
    """(train_plan, eval_plan) over any tokenised items (pairs, unpaired examples): train micro-batches of
    per_device_train_batch_size items in a deterministic shuffle per epoch (seed + epoch), eval batches in
    order and split by rank. `collate(items, idx, ref)` makes the tensors of items[idx] (`ref`: those rows of
    ref_train / ref_eval, or None); `lengths` are each train item's tokens per row for micro_batch_tokens
    (padded: the width of one of its `rows_per_item` rows)."""
    bsz = cfg.per_device_train_batch_size

    def epoch_batches(epoch: int) -> list[list[int]]:
        order = _shuffled(len(train), cfg.seed + epoch)
        return [order[s:s + bsz] for s in range(0, len(order), bsz)]

    def describe(items: list, what: str):
        return lambda idx: [str(items[i].source) if items[i].source else f"{what} {i}" for i in idx]

    regroup = None
    budget = token_budget(cfg.micro_batch_tokens, bsz, cfg.max_seq_length, rows_per_item=rows_per_item)
    if budget:
        regroup = functools.partial(regroup_by_tokens, lengths=lengths, budget=budget, padded=padded,
                                    rows_per_item=rows_per_item)

    train_plan = BatchPlan(epoch_batches,
                           lambda idx: collate(train, idx, None if ref_train is None else ref_train[idx]),
                           describe(train, noun), regroup)
    eval_plan = None
    if eval_:
        ebsz = cfg.per_device_eval_batch_size
        eval_batches = [list(range(s, min(s + ebsz, len(eval_)))) for s in range(0, len(eval_), ebsz)][rank::world]
        eval_plan = BatchPlan(lambda epoch: eval_batches,
                              lambda idx: collate(eval_, idx, None if ref_eval is None else ref_eval[idx]),
                              describe(eval_, f"eval {noun}"))
    return train_plan, eval_plan


__all__ = ["PreferenceData", "build_preference_data", "build_tokenised", "TokenStore", "PAIR_STORE", "make_pair_plans",
           "make_item_plans", "padded_rows", "tokenize_with_policy", "fit_lengths", "collate_pairs", "collate_pairs_packed",
           "collate_pairs_shared", "pair_layout", "pair_collator", "layout_tokens", "PAIR_LAYOUTS",
           "pair_as_example",
           "fit_pair", "tokenize_pairs", "pairs_digest", "pair_tokens"]
