"""`lmpipeline data inspect CONFIG`: examples as the model sees them, trained tokens highlighted.

Text mode prints each example rendered token by token (colour on a terminal, [[brackets]] around
trained tokens otherwise) plus token-length statistics; --jsonl prints one JSON object per example
with input_ids and labels (-100 where masked), or chosen_/rejected_ fields for preference rows.
"""

from __future__ import annotations

import json
import statistics
import sys

from lmpipeline.config.loader import load_config
from lmpipeline.data import masking, packing
from lmpipeline.errors import UserError
from lmpipeline.methods import method_for
from lmpipeline.models.loading import load_tokenizer


def _length_stats(lengths: list[int]) -> str:
    if not lengths:
        return "no examples"
    q = sorted(lengths)
    p95 = q[min(len(q) - 1, int(0.95 * len(q)))]
    return (f"{len(q)} examples; tokens min {q[0]}, median {int(statistics.median(q))}, mean {statistics.mean(q):.1f}, "
            f"p95 {p95}, max {q[-1]}")


def inspect_command(config: str, overrides: list[str], *, stage: str | None, n: int, as_jsonl: bool, packed: bool) -> int:
    cfg = load_config(config, overrides)
    name = stage or next((s for s in cfg.stages if method_for(s) is not None), None)
    if name is None or name not in cfg.stages or method_for(name) is None:
        raise UserError(f"no training stage `{stage}` in this config; stages: {', '.join(cfg.stages)}", key="--stage")
    method = method_for(name)
    stage_cfg = cfg.stage(name)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, eos_token=stage_cfg.eos_token,
                               pad_token=stage_cfg.pad_token, trust_remote_code=stage_cfg.trust_remote_code)
    color = sys.stdout.isatty() and not as_jsonl
    if not as_jsonl:
        print(masking.render_legend(color))

    view = method.inspect(stage_cfg, tokenizer, n)
    if view.header and not as_jsonl:
        print(view.header)
    for source, note, rows in view.items:
        if as_jsonl:
            record = {"source": source}
            for label, ex in rows:
                prefix = f"{label}_" if label else ""
                record.update({f"{prefix}input_ids": ex.input_ids, f"{prefix}labels": ex.labels})
            print(json.dumps(record))
            continue
        for i, (label, ex) in enumerate(rows):
            if i == 0:
                print(f"=== {source}" + (f"  {note}" if note else "") + (f" — {label}" if label else ""))
            else:
                print(f"--- {label}")
            print(masking.render_tokens(ex, tokenizer, color=color))
    if packed and method.terms.packs_rows and view.data is not None:
        _print_packed_row(view.data, stage_cfg, tokenizer, color=color, as_jsonl=as_jsonl)
    if not as_jsonl:
        print(_length_stats(view.lengths))
        if view.summary:
            print(view.summary)
    return 0


def _print_packed_row(data, stage_cfg, tokenizer, *, color: bool, as_jsonl: bool) -> None:
    """The first packed row of the data: examples end to end, each unable to attend to the one before."""
    bins = packing.pack_bfd([len(e) for e in data.train], stage_cfg.max_seq_length)
    first = [data.train[i] for i in bins[0]]
    batch = packing.collate_packed(first)
    if as_jsonl:
        print(json.dumps({"packed": True, "input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(),
                          "position_ids": batch["position_ids"][0].tolist()}))
        return
    print(f"=== packed row: {len(first)} examples, {batch['input_ids'].shape[1]} tokens "
          f"(capacity {stage_cfg.max_seq_length}); position_ids restart at each example")
    for ex in first:
        print(masking.render_tokens(ex, tokenizer, color=color))
        print("  |-- next example (cannot attend to the previous one) --|")
