"""Packing and batching: bins of examples, padded and padding-free collation, token-budget batches.

Strategies
    `pack_bfd`      best-fit decreasing: example indices into bins of at most `capacity` tokens.
                    Seed configs call this "ffd"; the config layer maps that name here. Examples stay
                    whole, so each keeps its own document boundaries (see collate_packed).
    `pack_wrapped`  concatenate everything and cut every `capacity` tokens (continued pre-training
                    on plain text: documents are split across rows and attend within a row).

Collators (return torch tensors)
    `collate_padded(examples, pad_token_id)`  -> input_ids, attention_mask, labels  [B, T]
        right padding; labels are IGNORE_INDEX on padding, so padding is masked by position and a
        pad id equal to eos never hides a real eos.
    `collate_packed(examples)`  -> padding-free, one row [1, sum(len)]:
        input_ids, labels, position_ids restarting at 0 for every example, cu_seq_lens (int32,
        [n + 1], cumulative lengths) and max_length (int, the longest example). The first label of
        every example is IGNORE_INDEX, so no example is trained to predict across a boundary (the
        model shifts labels left by one: the last token of example k would otherwise be trained to
        predict the first token of example k+1).

How packed examples are kept apart (transformers 5.23): with attention_mask=None, position_ids
given and no cache, `masking_utils.find_packed_sequence_indices` detects the restarts in
position_ids and `create_causal_mask` ANDs a same-document condition into the causal mask.
Checked: sdpa and eager in the unit tests, flex_attention once by hand (same loss; its CPU compile
takes minutes, so it is not in the suite). Flash-attention paths read the same position_ids, or
cu_seq_lens_q/k and max_length_q/k (`flash_attn_kwargs`). The caller must therefore pass
position_ids, pass NO attention_mask, and call the model with use_cache=False: LlamaModel creates a
DynamicCache when use_cache is on (the config default, in train mode too), a cache disables the
packed-sequence detection, and the row then silently attends across examples.
tests/unit/data/test_packing.py shows both: packed loss == padded loss, and != with the cache on.
On SDPA that mask is dense [T, T] (slow on long rows: bench/README.md's attention probe); with cu_seq_lens and
max_length (`flash_attn_kwargs`) models/attention.py's varlen kernel needs no mask at all.

Batching
    `regroup_by_tokens`: one optimizer step's micro-batches regrouped into as few as hold at most a
    token budget each (micro_batch_tokens). The step keeps its rows, so its gradient is unchanged
    (the loop normalises the loss over the whole step); short rows run in fewer, larger passes.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from lmpipeline.data.types import IGNORE_INDEX, TokenizedExample

__all__ = [
    "pack_bfd",
    "pack_examples",
    "pack_wrapped",
    "collate_padded",
    "collate_packed",
    "flash_attn_kwargs",
    "regroup_by_tokens",
]


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins whose total is <= capacity.

    Longest first, each into the fullest bin that still has room (ties: the earliest bin), else a
    new bin. O(n log n) with a sorted list of (free space, bin) keys. Every index appears exactly
    once. Raises ValueError for a length over capacity (truncate or drop over-long examples first)
    or a non-positive capacity.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted keys free * stride + bin_id: one int compare per bisect step, and bin ids break ties.
    stride = len(lengths) + 1
    free_keys: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(
                f"example {i} has {n} tokens, over the packing capacity {capacity}; truncate or drop "
                "over-long examples before packing"
            )
        if n <= 0:
            raise ValueError(f"example {i} is empty; drop empty examples before packing")
        pos = bisect.bisect_left(free_keys, n * stride)
        if pos < len(free_keys):
            key = free_keys.pop(pos)
            free, b = divmod(key, stride)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        free -= n
        if free > 0:
            bisect.insort(free_keys, free * stride + b)
    return bins


def regroup_by_tokens(micro_batches: Sequence[Sequence[int]], lengths: Sequence[int], budget: int, *,
                      padded: bool, rows_per_item: int = 1, world: int = 1) -> list[list[int]]:
    """One optimizer step's micro-batches (item indices) regrouped into as few micro-batches as hold
    at most `budget` tokens each, as they will be collated: padded, `rows_per_item` rows per item x the
    longest item (DPO pairs are two rows); padding-free, the sum of `lengths`. An item over the budget
    goes alone. The count is a multiple of `world`, so every rank trains as many micro-batches (the
    loop gives rank r groups r, r + world, ...); when that cannot be done the step is kept as it was.

    Why: a host-bound step (QLoRA on short rows: ~2,000 kernel launches per micro-batch) costs about
    the same per micro-batch whatever its size, so 8 rows of ~250 tokens run far faster as one pass of
    2,000 tokens than as 4 passes of 500, for the same gradient. Heaviest group first: an
    out-of-memory shows at the first micro-batch, and the allocator caches the big blocks first.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    items = [i for mb in micro_batches for i in mb]
    if len(items) < world:
        return [list(mb) for mb in micro_batches]
    position = {i: k for k, i in enumerate(items)}

    def cost(group: Sequence[int]) -> int:
        if padded:
            return rows_per_item * len(group) * max(lengths[i] for i in group)
        return sum(lengths[i] for i in group)

    if padded:  # longest first, cut greedily: each group pads to its first (longest) item
        groups: list[list[int]] = []
        for i in sorted(items, key=lambda i: (-lengths[i], position[i])):
            if groups and cost(groups[-1] + [i]) <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
    else:
        fits = [i for i in items if lengths[i] <= budget]
        groups = [[i] for i in items if lengths[i] > budget]
        bins = [[fits[k] for k in b] for b in pack_bfd([lengths[i] for i in fits], budget)] if fits else []
        groups += _balanced(bins, lengths, budget)
    while len(groups) % world:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            return [list(mb) for mb in micro_batches]
        big = max(splittable, key=cost)
        groups.remove(big)
        ordered = sorted(big, key=lambda i: -lengths[i])
        groups += [ordered[0::2], ordered[1::2]]  # alternate by length: two halves of similar cost
    groups = [sorted(g, key=position.__getitem__) for g in groups]
    return sorted(groups, key=lambda g: (-cost(g), position[g[0]]))


def _balanced(bins: list[list[int]], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """The same number of groups with their token sums evened out (longest item into the lightest
    group): best fit leaves one full group and one near-empty, and the peak memory follows the full
    one. Kept as packed when evening out would break the budget."""
    if len(bins) < 2:
        return bins
    groups: list[list[int]] = [[] for _ in bins]
    load = [0] * len(bins)
    for i in sorted((i for b in bins for i in b), key=lambda i: -lengths[i]):
        g = min(range(len(groups)), key=load.__getitem__)
        groups[g].append(i)
        load[g] += lengths[i]
    return groups if max(load) <= budget else bins


def pack_examples(examples: Sequence[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    """`pack_bfd` applied to examples: each inner list is one packed row for `collate_packed`."""
    return [[examples[i] for i in b] for b in pack_bfd([len(e) for e in examples], capacity)]


def pack_wrapped(
    examples: Sequence[TokenizedExample], capacity: int, *, drop_last: bool = False
) -> list[TokenizedExample]:
    """Concatenate all examples and cut into rows of `capacity` tokens (the last may be shorter,
    unless drop_last). Labels travel with their tokens; rows have no source."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
    rows = [
        TokenizedExample(ids[s : s + capacity], labels[s : s + capacity])
        for s in range(0, len(ids), capacity)
    ]
    if drop_last and rows and len(rows[-1]) < capacity:
        rows.pop()
    return rows


def collate_padded(
    examples: Sequence[TokenizedExample], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_token_id), attention_mask (1 real, 0 pad), labels (-100 pad)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; any id works (padding is masked), e.g. the eos id")
    width = max(len(e) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor | int]:
    """Padding-free row [1, T]: see the module docstring. Pass every example of a micro-batch (one or
    several bins, flattened); call the model with position_ids, no attention_mask, use_cache=False."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(e) for e in examples]
    if min(lengths) <= 0:
        raise ValueError("cannot pack an empty example")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex, n in zip(examples, lengths):
        ids.extend(ex.input_ids)
        labels.append(IGNORE_INDEX)  # never a target across the boundary
        labels.extend(ex.labels[1:])
        positions.extend(range(n))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "max_length": max(lengths),
    }


def flash_attn_kwargs(batch: dict) -> dict:
    """The keyword arguments a packed batch hands the model so attention sees example boundaries
    (transformers' FlashAttentionKwargs names: models/attention.py's varlen and flash_attention_2 read
    them, SDPA ignores them). {} for a batch that is not packed."""
    if "cu_seq_lens" not in batch:
        return {}
    cu, longest = batch["cu_seq_lens"], batch["max_length"]
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if "kv_gather" in batch:  # keys that differ from the queries (preference.collate_pairs_shared)
        kwargs.update(cu_seq_lens_k=batch["cu_seq_lens_k"], max_length_k=batch["max_length_k"],
                      kv_gather=batch["kv_gather"])
    return kwargs
