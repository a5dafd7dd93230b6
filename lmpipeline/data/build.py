"""From a stage config to tokenised training and eval examples, and the batches the loop consumes.

    read rows -> detect format -> convert + validate (on_invalid) -> select/split/mix
      -> render with the chat template and mask (assistant_only_loss / completion_only_loss)
      -> over-long policy (on_overlong) -> cache -> batch plan (padded or packed padding-free)

Every count of what happened to the rows ends in SFTData.report and in run.json; nothing is dropped
silently. Errors name the config key and the file:line of the row.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from dataclasses import dataclass, field

from lmpipeline.config.schema import DatasetSpec, SFTConfig, TrainStageConfig, token_budget
from lmpipeline.data import cache, masking, packing, readers, templates, validate
from lmpipeline.data.types import (
    ChatExample,
    CompletionExample,
    DataError,
    DataReport,
    TextExample,
    TokenizedExample,
    stage_for_rows,
)
from lmpipeline.errors import UserError
from lmpipeline.models.compile import shaped_for_layers
from lmpipeline.data.batch_plan import BatchPlan

log = logging.getLogger(__name__)


@dataclass
class TokenizedData:
    """A stage's tokenised train (and eval) items with what happened to the rows: what SFT examples,
    preference pairs and unpaired examples share."""

    train: list
    eval: list | None
    report: DataReport
    formats: list[str] = field(default_factory=list)
    fingerprint: str = ""
    cache_hit: bool = False
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def _summary(self, items: str) -> str:
        return (f"{items}; format {'+'.join(self.formats)}; {self.report.summary()}; "
                f"cache {'hit' if self.cache_hit else 'miss'}")

    def _describe(self, counts: dict) -> dict:
        return {
            "formats": self.formats,
            "fingerprint": self.fingerprint,
            "cache_hit": self.cache_hit,
            **counts,
            "rows_read": self.report.total_rows,
            "invalid_skipped": self.report.skipped_invalid,
            "truncated": self.report.truncated,
            "overlong_dropped": self.report.dropped_overlong,
            "warnings": self.warnings,
        }


class SFTData(TokenizedData):
    train: list[TokenizedExample]
    eval: list[TokenizedExample] | None

    def summary(self) -> str:
        ev = f", {len(self.eval)} eval" if self.eval is not None else ""
        tokens = sum(len(e) for e in self.train)
        trained = sum(e.num_trained for e in self.train)
        return self._summary(f"{len(self.train)} train examples{ev} ({tokens:,} tokens, {trained:,} trained)")

    def describe(self) -> dict:
        return self._describe({
            "train_examples": len(self.train),
            "eval_examples": len(self.eval) if self.eval is not None else 0,
            "train_tokens": sum(len(e) for e in self.train),
            "trained_tokens": sum(e.num_trained for e in self.train),
        })


def _key(cfg: TrainStageConfig, name: str) -> str:
    return f"stage_configs.{cfg.stage_name or 'sft'}.{name}"


def dataset_specs(cfg: TrainStageConfig) -> list[DatasetSpec]:
    src = cfg.dataset_name_or_path
    if src is None:
        raise UserError("no training data given", key=_key(cfg, "dataset_name_or_path"),
                        hint="set it to a file (.jsonl/.json/.csv/.parquet/.txt), a folder or a Hub dataset name")
    if isinstance(src, str):
        return [DatasetSpec(path=src, format=cfg.dataset_format, split=cfg.dataset_split,
                            max_samples=cfg.max_samples, column_mapping=cfg.column_mapping)]
    return src


def read_source(spec: DatasetSpec, cfg: TrainStageConfig, key: str, *, on_invalid: str | None = None):
    """Rows of one source converted to examples, with the report of what was wrong."""
    options = dict(text_field=cfg.dataset_text_field, column_mapping=spec.column_mapping or cfg.column_mapping,
                   seed=cfg.seed)
    if hasattr(cfg, "ultrafeedback_rejected"):
        options["ultrafeedback_rejected"] = cfg.ultrafeedback_rejected
    try:
        rows = readers.read_rows(spec.path, split=spec.split if spec.split != "train" else None,
                                 text_field=cfg.dataset_text_field)
        examples, report = validate.validate_rows(rows, spec.format or cfg.dataset_format or "auto",
                                                  on_invalid=on_invalid or cfg.on_invalid, **options)
    except validate.InvalidDataError as e:
        raise UserError(f"invalid rows in `{spec.path}`:\n{e}", key=key) from None
    except DataError as e:
        hint = None
        if "format" in str(e).lower():
            hint = "set dataset_format (alpaca, messages, sharegpt, text, prompt_completion, ...) or column_mapping"
        raise UserError(str(e), key=key, hint=hint) from None
    if not examples:
        raise UserError(f"`{spec.path}` has no usable rows ({report.summary()})", key=key)
    if spec.max_samples:
        examples = readers.select_rows(examples, max_samples=spec.max_samples)
    return examples, report, report.format


def load_examples(cfg: TrainStageConfig, *, on_invalid: str | None = None):
    """All training examples (mixed by weight when several sources) plus the eval examples."""
    specs = dataset_specs(cfg)
    per_source, fmts, report = [], [], validate.ValidationReport()
    for i, spec in enumerate(specs):
        key = _key(cfg, "dataset_name_or_path") + (f"[{i}]" if len(specs) > 1 else "")
        ex, rep, fmt = read_source(spec, cfg, key, on_invalid=on_invalid)
        per_source.append((ex, spec.weight))
        fmts.append(fmt)
        _merge_reports(report, rep)
    if len(per_source) == 1:
        examples = per_source[0][0]
    else:
        examples = readers.mix_datasets(per_source, seed=cfg.seed)

    eval_examples = None
    if cfg.eval_dataset_name_or_path:
        spec = DatasetSpec(path=cfg.eval_dataset_name_or_path, format=cfg.dataset_format, column_mapping=cfg.column_mapping)
        eval_examples, rep, _ = read_source(spec, cfg, _key(cfg, "eval_dataset_name_or_path"), on_invalid=on_invalid)
        _merge_reports(report, rep)
    elif cfg.validation_split_ratio > 0:
        parts = readers.split_rows(examples, ratio=cfg.validation_split_ratio, seed=cfg.seed)
        examples, eval_examples = parts["train"], parts["validation"]
    return examples, eval_examples, report, fmts


def _merge_reports(into: "validate.ValidationReport", other: "validate.ValidationReport") -> None:
    into.total_rows += other.total_rows
    into.kept += other.kept
    into.skipped_invalid += other.skipped_invalid
    into.invalid += other.invalid
    into.issues.extend(other.issues)
    for why, n in other.skipped.items():
        into.skipped[why] = into.skipped.get(why, 0) + n
    into.format = "+".join(f for f in (into.format, other.format) if f)


def needs_template(examples) -> bool:
    return any(isinstance(e, ChatExample) for e in examples)


def chat_template_for(cfg: TrainStageConfig, tokenizer) -> str:
    try:
        return templates.resolve_chat_template(tokenizer, chat_template_path=cfg.chat_template_path,
                                               chat_template=cfg.chat_template)
    except DataError as e:
        key = "chat_template_path" if cfg.chat_template_path else "chat_template"
        raise UserError(e.reason, key=_key(cfg, key)) from None


# Conversations with more messages than this are first cut to the turns that can matter (see below).
LONG_CHAT_MESSAGES = 64


def _head_of_long_chat(ex: ChatExample, tokenizer, template: str, max_tokens: int) -> ChatExample:
    """The first turns of a very long conversation: enough that masking sees the same first max_tokens.

    Assistant masking renders every prefix of a conversation, which is quadratic in its turns: a
    100,000-turn row would take hours. Turns past max_seq_length are never trained (truncate) and do
    not change the verdict (drop/error: the row is over-long either way), so the conversation is cut
    to 2k messages, where the first k already render to more than max_tokens tokens. The first k
    render to the same text inside both conversations (templates are prefix-preserving; masking
    checks it), so the first max_tokens tokens and labels are those of the whole conversation.
    """
    msgs = ex.messages
    k = LONG_CHAT_MESSAGES // 2
    while 2 * k < len(msgs):
        try:
            text = templates.render(tokenizer, template, msgs[:k], tools=ex.tools)
        except Exception:  # noqa: BLE001 - masking renders it again and reports the error with the row
            return ex
        # +16: room for what a template writes after the last message only (e.g. a final eos).
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_tokens + 16:
            return dataclasses.replace(ex, messages=msgs[: 2 * k])
        k *= 2
    return ex


def tokenize_sft(examples, cfg: SFTConfig, tokenizer, template: str | None, report: DataReport) -> list[TokenizedExample]:
    """Render and mask every example; apply on_overlong and count what it touched."""
    out = []
    loss_on = "assistant" if cfg.assistant_only_loss else "all"
    completion_only = True if cfg.completion_only_loss is None else cfg.completion_only_loss
    keep_whole = cfg.packing and cfg.packing_strategy == "wrapped"
    for ex in examples:
        cut = False
        try:
            if isinstance(ex, ChatExample):
                if len(ex.messages) > LONG_CHAT_MESSAGES and not keep_whole:
                    head = _head_of_long_chat(ex, tokenizer, template, cfg.max_seq_length)
                    cut, ex = head is not ex, head
                tok = masking.tokenize_chat(ex, tokenizer, template, loss_on=loss_on)
            elif isinstance(ex, CompletionExample):
                tok = masking.tokenize_completion(ex, tokenizer, completion_only=completion_only)
            elif isinstance(ex, TextExample):
                tok = masking.tokenize_text(ex, tokenizer)
            else:
                raise DataError(f"{type(ex).__name__} rows are not SFT data: train them in {stage_for_rows(ex)}", ex.source)
        except DataError as e:
            if e.source is None:
                e = DataError(e.reason, ex.source, e.key)
            if cfg.on_invalid == "error":
                raise UserError(str(e), key=_key(cfg, "dataset_name_or_path"),
                                hint="fix the row, or set on_invalid: skip to drop such rows (they are counted)") from None
            report.issues.append(e)
            report.skipped_invalid += 1
            continue
        if len(tok) > cfg.max_seq_length:
            if cfg.on_overlong == "error":
                raise UserError(f"{ex.source}: example has {len(tok)}{'+' if cut else ''} tokens, over "
                                f"max_seq_length={cfg.max_seq_length}",
                                key=_key(cfg, "on_overlong"), hint="raise max_seq_length, or use on_overlong: truncate|drop")
            if cfg.on_overlong == "drop":
                report.dropped_overlong += 1
                continue
            # Packing "wrapped" cuts long text itself; truncating first would lose the tail.
            if not (cfg.packing and cfg.packing_strategy == "wrapped"):
                tok = TokenizedExample(tok.input_ids[: cfg.max_seq_length], tok.labels[: cfg.max_seq_length], tok.source)
                report.truncated += 1
        if tok.num_trained == 0:
            report.issues.append(DataError("no token of this example is trained (empty answer, or truncated away)", ex.source))
            report.skipped_invalid += 1
            continue
        out.append(tok)
    return out


def build_sft_data(cfg: SFTConfig, tokenizer) -> SFTData:
    key_parts = cache.fingerprint_inputs(cfg, tokenizer)
    cached = cache.load(key_parts)
    if cached is not None:
        train, eval_, meta = cached
        report = DataReport(**meta["report"])
        return SFTData(train, eval_, report, meta["formats"], meta["fingerprint"], True, meta.get("chat_template"),
                       meta.get("warnings", []))

    examples, eval_examples, report, fmts = load_examples(cfg)
    template = chat_template_for(cfg, tokenizer) if needs_template(examples + (eval_examples or [])) else None
    train = tokenize_sft(examples, cfg, tokenizer, template, report)
    eval_ = tokenize_sft(eval_examples, cfg, tokenizer, template, report) if eval_examples else None
    if not train:
        raise UserError(f"no usable training examples after tokenisation ({report.summary()})",
                        key=_key(cfg, "dataset_name_or_path"))
    report.kept = len(train)
    warns = masking.check_trained_tokens(train, tokenizer, template) if hasattr(masking, "check_trained_tokens") else []
    for w in warns:
        log.warning(w)
    if template is not None:
        # The saved tokenizer must carry the template the model was trained with.
        tokenizer.chat_template = template
    fingerprint = cache.save(key_parts, train, eval_, {
        "report": {k: getattr(report, k) for k in ("total_rows", "kept", "skipped_invalid", "truncated", "dropped_overlong")},
        "formats": fmts, "chat_template": template, "warnings": warns,
    })
    if report.issues:
        log.warning("%d rows were skipped or changed; first ones:\n%s", len(report.issues),
                    validate.format_report(report, max_issues=5))
    return SFTData(train, eval_, report, fmts, fingerprint, False, template, warns)


# ----------------------------------------------------------------------------------------------
# Batches


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def make_batch_plans(cfg: TrainStageConfig, data: SFTData, tokenizer, *, rank: int = 0, world: int = 1):
    """Deterministic micro-batch orders: padded batches, padding-free rows (padding_free), or packed bins."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bsz = cfg.per_device_train_batch_size
    train = data.train

    if cfg.packing and cfg.packing_strategy == "wrapped":
        train = packing.pack_wrapped(train, cfg.max_seq_length)

    if cfg.packing and cfg.packing_strategy in ("bfd", "ffd"):
        bins = packing.pack_bfd([len(e) for e in train], cfg.max_seq_length)

        def epoch_batches(epoch: int) -> list[list[int]]:
            order = _shuffled(len(bins), cfg.seed + epoch)
            return [[i for b in order[s:s + bsz] for i in bins[b]] for s in range(0, len(order), bsz)]

        def collate(idx: list[int]) -> dict:
            return shaped_for_layers(packing.collate_packed([train[i] for i in idx]), cfg)
    else:
        def epoch_batches(epoch: int) -> list[list[int]]:
            order = _shuffled(len(train), cfg.seed + epoch)
            return [order[s:s + bsz] for s in range(0, len(order), bsz)]

        def collate(idx: list[int]) -> dict:
            examples = [train[i] for i in idx]
            if cfg.padding_free is not True:  # "auto" is resolved by the stage (it needs the model)
                return packing.collate_padded(examples, pad_id)
            return shaped_for_layers(packing.collate_packed(examples), cfg)

    def describe(idx: list[int]) -> list[str]:
        return [str(train[i].source) if train[i].source else f"example {i}" for i in idx]

    regroup = None
    budget = token_budget(cfg.micro_batch_tokens, bsz, cfg.max_seq_length)
    if budget:
        # packed bins are flattened into one row anyway: padding-free like padding_free
        regroup = functools.partial(packing.regroup_by_tokens, lengths=[len(e) for e in train], budget=budget,
                                    padded=not (cfg.packing or cfg.padding_free is True))
    train_plan = BatchPlan(epoch_batches, collate, describe, regroup)
    eval_plan = None
    if data.eval:
        ev, ebsz = data.eval, cfg.per_device_eval_batch_size
        eval_batches = [list(range(s, min(s + ebsz, len(ev)))) for s in range(0, len(ev), ebsz)][rank::world]
        eval_plan = BatchPlan(lambda epoch: eval_batches, lambda idx: packing.collate_padded([ev[i] for i in idx], pad_id))
    return train_plan, eval_plan


__all__ = ["SFTData", "build_sft_data", "make_batch_plans", "load_examples", "read_source"]
