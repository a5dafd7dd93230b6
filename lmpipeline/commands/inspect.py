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
from lmpipeline.config.schema import STAGE_ALIASES, TRAINING_KINDS
from lmpipeline.errors import UserError


def _length_stats(lengths: list[int]) -> str:
    if not lengths:
        return "no examples"
    q = sorted(lengths)
    p95 = q[min(len(q) - 1, int(0.95 * len(q)))]
    return (f"{len(q)} examples; tokens min {q[0]}, median {int(statistics.median(q))}, mean {statistics.mean(q):.1f}, "
            f"p95 {p95}, max {q[-1]}")


def inspect_command(config: str, overrides: list[str], *, stage: str | None, n: int, as_jsonl: bool, packed: bool) -> int:
    from lmpipeline.data import masking, packing
    from lmpipeline.models.loading import load_tokenizer

    cfg = load_config(config, overrides)
    name = stage or next((s for s in cfg.stages if STAGE_ALIASES[s] in TRAINING_KINDS), None)
    if name is None or name not in cfg.stages or STAGE_ALIASES[name] not in TRAINING_KINDS:
        raise UserError(f"no training stage `{stage}` in this config; stages: {', '.join(cfg.stages)}", key="--stage")
    stage_cfg = cfg.stage(name)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, eos_token=stage_cfg.eos_token,
                               pad_token=stage_cfg.pad_token, trust_remote_code=stage_cfg.trust_remote_code)
    color = sys.stdout.isatty() and not as_jsonl

    if STAGE_ALIASES[name] == "dpo":
        from lmpipeline.data.preference import build_preference_data, pair_as_example

        pairs = build_preference_data(stage_cfg, tokenizer).train
        for pair in pairs[:n]:
            chosen = pair_as_example(pair, "chosen")
            rejected = pair_as_example(pair, "rejected")
            if as_jsonl:
                print(json.dumps({"source": str(pair.source), "chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
                                  "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels}))
            else:
                print(f"=== {pair.source} — chosen")
                print(masking.render_tokens(chosen, tokenizer, color=color))
                print("--- rejected")
                print(masking.render_tokens(rejected, tokenizer, color=color))
        if not as_jsonl:
            print(_length_stats([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]))
        return 0

    from lmpipeline.data.build import build_sft_data

    data = build_sft_data(stage_cfg, tokenizer)
    if not as_jsonl:
        print(f"trained: {'assistant turns' if stage_cfg.assistant_only_loss else 'every token'} "
              f"(assistant_only_loss: {str(stage_cfg.assistant_only_loss).lower()}); a turn's loss_weight, where the data "
              "has one, wins: 0 = shown, not trained; 1 = trained")
    for ex in data.train[:n]:
        if as_jsonl:
            print(json.dumps({"source": str(ex.source), "input_ids": ex.input_ids, "labels": ex.labels}))
        else:
            print(f"=== {ex.source}  ({len(ex)} tokens, {ex.num_trained} trained)")
            print(masking.render_tokens(ex, tokenizer, color=color))
    if packed:
        bins = packing.pack_bfd([len(e) for e in data.train], stage_cfg.max_seq_length)
        first = [data.train[i] for i in bins[0]]
        batch = packing.collate_packed(first)
        if as_jsonl:
            print(json.dumps({"packed": True, "input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(),
                              "position_ids": batch["position_ids"][0].tolist()}))
        else:
            print(f"=== packed row: {len(first)} examples, {batch['input_ids'].shape[1]} tokens "
                  f"(capacity {stage_cfg.max_seq_length}); position_ids restart at each example")
            for ex in first:
                print(masking.render_tokens(ex, tokenizer, color=color))
                print("  |-- next example (cannot attend to the previous one) --|")
    if not as_jsonl:
        print(_length_stats([len(e) for e in data.train]))
        print(f"data: {data.summary()}")
    return 0
