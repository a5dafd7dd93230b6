"""The eval stage: the base model and every trained stage, side by side, on the same data and prompts.

For each model (base first, then each sft/dpo stage of the run in order; `models` narrows the list):
    loss + perplexity   on `eval_dataset` (any SFT format), or on the golden rows that have a
                        reference (prompt -> reference as one assistant turn); chat rows are rendered
                        with the chat template and measured on assistant tokens (`loss_on`)
    generation          greedy, on the golden prompts, through lmpipeline's engine
                        (lmpipeline/generation; generation_batch_size slots)
    metrics             exact match, ROUGE-L, BLEU (rows with a reference), length statistics,
                        generation throughput (lmpipeline/evaluate/metrics.py)

Every model sees the same chat template: `chat_template`/`chat_template_path` when given, else the
template of the latest trained stage's tokenizer (training stores it there), else the base's; a
base model without a template is thus prompted the way the tuned model was trained.

Writes <stage dir>/results.json (settings and one row per model) and samples.jsonl (one line per
prompt: the prompt, its reference and every model's output). Returns a StageResult with no model
(final_dir None); its metrics are the last model's, plus the base's prefixed "base_".

Models are loaded one at a time and released before the next: peak memory is one model.
Raises UserError: nothing to evaluate (no golden set and no eval data), unknown stage names in
`models`, chat prompts without any chat template, and any loading error (see generation.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lmpipeline.config.lifecycle import EvalConfig
from lmpipeline.context import RUN_FILE, RunContext, StageResult
from lmpipeline.data.cache import file_sha256
from lmpipeline.errors import UserError
from lmpipeline.evaluate import generation as gen
from lmpipeline.evaluate import metrics as mt
from lmpipeline.methods import makes_causal_lm
from lmpipeline.numbers import fmt_number

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
TABLE_COLUMNS = ("eval_loss", "eval_perplexity", "exact_match", "rouge_l", "bleu", "gen_tokens_mean",
                 "truncated_fraction", "generated_tokens_per_second")


@dataclass
class Candidate:
    label: str
    kind: str  # "base" or the stage kind
    spec: gen.ModelSpec


def models_to_compare(cfg: EvalConfig, ctx: RunContext) -> list[Candidate]:
    """Base (unless compare_base is off) and the trained stages, each as a loadable ModelSpec."""
    run = gen.read_run(ctx.run_dir) if (Path(ctx.run_dir) / RUN_FILE).is_file() else None
    trained = [(i, s) for i, s in enumerate(ctx.completed) if s.trained and s.final_dir is not None]
    if cfg.models is not None:
        names = {s.name for _, s in trained}
        unknown = [m for m in cfg.models if m not in names]
        if unknown:
            raise UserError(f"no finished sft/dpo stage named {', '.join(unknown)}; finished: "
                            f"{', '.join(sorted(names)) or 'none'}", key=_key(cfg, "models"))
        trained = [(i, s) for i, s in trained if s.name in cfg.models]
    # A reward model scores, it does not generate: eval compares the causal LMs only.
    scorers = [s.name for _, s in trained if not makes_causal_lm(s.kind)]
    if scorers and cfg.models is not None:
        raise UserError(f"{', '.join(scorers)} trained a model that scores sequences, not one that generates; eval "
                        "measures loss and generations", key=_key(cfg, "models"), hint="leave it out of models")
    if scorers:
        log.info("eval leaves out %s: a model that scores sequences, not one that generates", ", ".join(scorers))
    trained = [(i, s) for i, s in trained if makes_causal_lm(s.kind)]
    out = []
    if cfg.compare_base:
        out.append(Candidate("base", "base", gen.ModelSpec(base=ctx.base_model, tokenizer=ctx.tokenizer_path or ctx.base_model,
                                                           label="base")))
    for i, s in trained:
        if run is not None and any(r.name == s.name and r.final_dir is not None for r in run.stages):
            spec = gen.resolve_in_run(run, s.name, ctx.base_model)
        else:
            spec = gen.spec_from_completed(ctx.completed[: i + 1], ctx.base_model)
        spec.label = s.name
        out.append(Candidate(s.name, s.kind, spec))
    return out


def _key(cfg: EvalConfig, name: str) -> str:
    return f"stage_configs.{cfg.stage_name or 'eval'}.{name}"


def file_fingerprint(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return file_sha256(Path(path))


# ------------------------------------------------------------------------------------- loss data


def loss_examples(cfg: EvalConfig, prompts: list[gen.PromptRow] | None):
    """Examples (lmpipeline.data.types) for the loss pass, or None when there is nothing to measure."""
    from lmpipeline.data import readers, validate
    from lmpipeline.data.types import DataError

    if cfg.eval_dataset:
        try:
            rows = readers.read_rows(cfg.eval_dataset)
            examples, report = validate.validate_rows(rows, cfg.dataset_format or "auto", on_invalid="skip")
        except DataError as e:
            raise UserError(str(e), key=_key(cfg, "eval_dataset")) from None
        if report.skipped_invalid:
            log.warning("eval_dataset: %s", report.summary())
        return examples[: cfg.max_eval_samples] if cfg.max_eval_samples else examples
    if not prompts:
        return None
    out = [GoldenPair(p.prompt, p.reference) for p in prompts if p.reference is not None]
    return (out[: cfg.max_eval_samples] if cfg.max_eval_samples else out) or None


@dataclass
class GoldenPair:
    """A golden prompt with its reference, scored as one assistant answer (rendered per template)."""

    prompt: str | list[dict]
    reference: str


def tokenize_for_loss(examples, tokenizer, template: str | None, cfg: EvalConfig):
    from lmpipeline.data import masking
    from lmpipeline.data.types import ChatExample, CompletionExample, DataError, TextExample

    out, skipped = [], 0
    for ex in examples:
        try:
            if isinstance(ex, GoldenPair):
                ex = _golden_example(ex, template, cfg)
            if isinstance(ex, ChatExample):
                if template is None:
                    raise UserError("the loss data is chat data but no chat template is known",
                                    key=_key(cfg, "chat_template"), hint="set chat_template (e.g. chatml)")
                tok = masking.tokenize_chat(ex, tokenizer, template, loss_on=cfg.loss_on)
            elif isinstance(ex, CompletionExample):
                tok = masking.tokenize_completion(ex, tokenizer, completion_only=cfg.loss_on == "assistant")
            elif isinstance(ex, TextExample):
                tok = masking.tokenize_text(ex, tokenizer)
            else:
                raise UserError(f"{type(ex).__name__} rows cannot be scored by loss here (preference data?)",
                                key=_key(cfg, "eval_dataset"))
        except DataError as e:
            skipped += 1
            log.warning("loss data: skipped %s", e)
            continue
        tok = masking.apply_overlong(tok, cfg.max_seq_length, "truncate")
        if tok.num_trained:
            out.append(tok)
        else:
            skipped += 1
    return out, skipped


def _golden_example(pair: GoldenPair, template: str | None, cfg: EvalConfig):
    from lmpipeline.data.types import ChatExample, CompletionExample

    if template is None and isinstance(pair.prompt, str):
        return CompletionExample(pair.prompt, pair.reference)
    messages = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else list(pair.prompt)
    return ChatExample(messages + [{"role": "assistant", "content": pair.reference}])


# ------------------------------------------------------------------------------------------ stage


class EvalStage:
    """`EvalStage(EvalConfig).execute(ctx)` -> StageResult; see the module docstring."""

    def __init__(self, config: EvalConfig):
        if not isinstance(config, EvalConfig):
            raise TypeError(f"EvalStage needs an EvalConfig, got {type(config).__name__}")
        self.config = config
        self._tokenizers: dict = {}

    def execute(self, ctx: RunContext) -> StageResult:
        cfg = self.config
        name = cfg.stage_name or "eval"
        out = Path(cfg.output_dir) if cfg.output_dir else Path(ctx.run_dir) / name
        out.mkdir(parents=True, exist_ok=True)

        prompts = None
        if cfg.golden_set:
            prompts = gen.read_prompts(cfg.golden_set, max_samples=cfg.max_samples, system_prompt=cfg.system_prompt,
                                       key=_key(cfg, "golden_set"))
        examples = loss_examples(cfg, prompts)
        if not prompts and not examples:
            raise UserError("nothing to evaluate: set golden_set (prompts to generate for) and/or eval_dataset",
                            key=_key(cfg, "golden_set"))
        candidates = models_to_compare(cfg, ctx)
        if not candidates:
            raise UserError("no model to evaluate: compare_base is off and no sft/dpo stage finished before",
                            key=_key(cfg, "compare_base"))
        template, template_from = self._template(candidates, ctx)

        rows, outputs = [], {}
        for c in candidates:
            row, gens = self._evaluate_one(c, template, prompts, examples)
            rows.append(row)
            if gens is not None:
                outputs[c.label] = gens
            log.info("[%s] %s: %s", name, c.label, _fmt(row))

        results = {
            "golden_set": cfg.golden_set,
            "golden_set_sha256": file_fingerprint(cfg.golden_set),
            "eval_dataset": cfg.eval_dataset,
            "num_prompts": len(prompts or []),
            "num_loss_examples": len(examples or []),
            "generation": {"greedy": True, "max_new_tokens": cfg.max_new_tokens,
                           "batch_size": cfg.generation_batch_size, "engine": "lmpipeline.generation"},
            "chat_template_from": template_from,
            "columns": list(TABLE_COLUMNS),
            "models": rows,
        }
        _write_json(out / RESULTS_FILE, results)
        if prompts:
            write_samples(out / SAMPLES_FILE, prompts, outputs)
        log.info("[%s] results:\n%s", name, format_table(rows))
        for line in format_samples(prompts or [], outputs, cfg.num_print_samples):
            log.info("%s", line)
        return StageResult(name, out, None, metrics=summary_metrics(rows),
                           data={"golden_set": cfg.golden_set, "fingerprint": results["golden_set_sha256"],
                                 "eval_dataset": cfg.eval_dataset},
                           notes={"results": str(out / RESULTS_FILE), "models": [r["name"] for r in rows]})

    def _template(self, candidates: list[Candidate], ctx: RunContext) -> tuple[str | None, str]:
        cfg = self.config
        if cfg.chat_template or cfg.chat_template_path:
            from lmpipeline.models.loading import load_tokenizer

            tok = load_tokenizer(candidates[-1].spec.tokenizer or candidates[-1].spec.base)
            t = gen.resolve_template(tok, chat_template=cfg.chat_template, chat_template_path=cfg.chat_template_path)
            return t, "config"
        for c in reversed(candidates):
            tok = self._tokenizer(c)
            t = gen.resolve_template(tok)
            if t is not None:
                return t, c.label
        return None, "none (raw text prompts)"

    def _tokenizer(self, c: Candidate):
        # Loaded once per folder: the template lookup and the evaluation need the same tokenizer.
        key = c.spec.tokenizer or c.spec.base
        if key not in self._tokenizers:
            self._tokenizers[key] = gen.load_tokenizer_for(c.spec, trust_remote_code=self.config.trust_remote_code)
        return self._tokenizers[key]

    def _evaluate_one(self, c: Candidate, template, prompts, examples):
        cfg = self.config
        t0 = time.perf_counter()
        model, tokenizer = gen.load_spec(c.spec, dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code,
                                         tokenizer=self._tokenizer(c), allow_pickle_weights=cfg.allow_pickle_weights)
        row = {"name": c.label, "kind": c.kind, **{k: v for k, v in c.spec.describe().items() if k != "label"},
               "load_seconds": round(time.perf_counter() - t0, 3)}
        try:
            if examples:
                toks, skipped = tokenize_for_loss(examples, tokenizer, template, cfg)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                row.update(mt.mean_token_loss(model, toks, pad_id=pad, batch_size=cfg.per_device_eval_batch_size))
                row["loss_examples_skipped"] = skipped
            gens = None
            if prompts:
                t1 = time.perf_counter()
                gens = gen.generate_batch(model, tokenizer, [p.prompt for p in prompts], chat_template=template,
                                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
                seconds = time.perf_counter() - t1
                row.update(mt.text_metrics(gens, [p.reference for p in prompts], cfg.metrics))
                row["generation_seconds"] = round(seconds, 3)
                row["generated_tokens_per_second"] = sum(g.num_tokens for g in gens) / max(seconds, 1e-9)
        finally:
            del model
            gen.release_memory()
        return row, gens


# ----------------------------------------------------------------------------------------- output


def summary_metrics(rows: list[dict]) -> dict:
    """The last model's numbers, and the base's prefixed base_ (what run.json and the CLI show)."""
    keep = ("eval_loss", "eval_perplexity", "exact_match", "rouge_l", "bleu", "gen_tokens_mean")
    out = {}
    last = rows[-1]
    out.update({k: last[k] for k in keep if isinstance(last.get(k), (int, float))})
    for r in rows[:-1]:
        if r["kind"] == "base":
            out.update({f"base_{k}": r[k] for k in keep if isinstance(r.get(k), (int, float))})
    return out


def write_samples(path: Path, prompts: list[gen.PromptRow], outputs: dict[str, list[gen.Generation]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            rec = {"index": i, "source": p.source, "prompt": p.prompt, "prompt_text": gen.prompt_text(p.prompt),
                   "reference": p.reference,
                   "outputs": {label: g[i].text for label, g in outputs.items()},
                   "num_tokens": {label: g[i].num_tokens for label, g in outputs.items()}}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt_number(v)


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={_num(row[k])}" for k in TABLE_COLUMNS if k in row)


def format_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    """A plain-text table, one line per model."""
    cols = [c for c in columns if any(c in r for r in rows)]
    head = ["model"] + cols
    body = [[r["name"]] + [_num(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + body]
    return "\n".join(lines)


def format_samples(prompts: list[gen.PromptRow], outputs: dict[str, list[gen.Generation]], n: int,
                   width: int = 300) -> list[str]:
    def clip(t: str) -> str:
        t = t.replace("\n", "\\n")
        return t if len(t) <= width else t[:width] + " ..."

    lines = []
    for i, p in enumerate(prompts[:n]):
        lines.append(f"--- sample {i + 1} ({p.source})")
        lines.append(f"prompt:    {clip(gen.prompt_text(p.prompt))}")
        if p.reference is not None:
            lines.append(f"reference: {clip(p.reference)}")
        for label, g in outputs.items():
            lines.append(f"{label + ':':<10} {clip(g[i].text)}")
    return lines


__all__ = ["EvalStage", "models_to_compare", "format_table", "format_samples", "RESULTS_FILE", "SAMPLES_FILE"]
