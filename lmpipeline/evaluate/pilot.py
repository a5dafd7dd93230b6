"""A pilot run: a short training run, then evaluation, to check the set-up before a long run.

    run_pilot(config, overrides, steps=100)
      1. the config's first training stage only, limited to `steps` optimizer steps, trained on the
         eval stage's golden set when one is named (else on the stage's own data); no checkpoints;
         written to <output_dir>-pilot (never over the real run)
      2. the eval stage's settings (base vs pilot model, greedy generation) on every prompt of the golden
         set (or the eval stage's max_samples), or on the first 8 rows of the training data when there is none
      3. prints the eval table and sample generations, and whether the training loss fell (first vs
         last logged loss in metrics.jsonl); the same summary goes to <pilot dir>/pilot.json, and the
         run's report.html is rebuilt with the pilot's evaluation in it

Every value changed for the pilot (max_steps, data, logging_steps, save_strategy, output_dir) is
printed and stored in run.json's "derived". Golden rows in the {"prompt", "reference"} shape are
trained the way the evaluation renders them: through the chat template as a user turn and an
assistant turn (instruction_response with prompt -> instruction, reference -> response, the answer
alone trained) when the evaluation uses a template, as raw prompt + completion text when it does not. Other shapes are read
as the SFT formats they are.

Raises UserError: no training stage, and whatever the training and eval stages raise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmpipeline.config.lifecycle import EvalConfig
from lmpipeline.context import RunContext, StageOutput
from lmpipeline.errors import UserError
from lmpipeline.methods import METHODS, method_for
from lmpipeline.report.html import write_report

log = logging.getLogger(__name__)

PILOT_FILE = "pilot.json"
DEFAULT_PROMPTS = 8


def _kinds(cfg) -> dict[str, str]:
    kinds = dict(cfg.stage_kinds)
    for name in cfg.stages:  # stage names of lifecycle kinds before they are registered as aliases
        kinds.setdefault(name, name if name in ("eval", "merge", "package") else "")
    return kinds


def _golden_is_native(path: str) -> bool:
    """True when the golden rows are {"prompt", "reference"} (not an SFT format the data layer reads)."""
    from lmpipeline.data import readers
    from lmpipeline.data.types import DataError

    try:
        rows = [r for _, r in readers.read_rows(path) if isinstance(r, dict)][:20]
    except DataError as e:
        raise UserError(str(e), key="golden_set") from None
    return bool(rows) and all("prompt" in r and "completion" not in r for r in rows)


def loss_trend(metrics_file: Path) -> dict:
    """First and last logged training loss and whether it fell."""
    losses = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
                losses.append((rec["step"], float(rec["loss"])))
    if len(losses) < 2:
        return {"first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
                "loss_fell": None, "logged_points": len(losses)}
    return {"first_step": losses[0][0], "first_loss": losses[0][1], "last_step": losses[-1][0],
            "last_loss": losses[-1][1], "loss_fell": losses[-1][1] < losses[0][1], "logged_points": len(losses)}


def pilot_eval_config(cfg) -> EvalConfig:
    """The config's eval stage settings (defaults when it has none), which the pilot evaluates with."""
    kinds = _kinds(cfg)
    eval_names = [n for n in cfg.stages if kinds.get(n) == "eval"]
    raw_eval = dict(cfg.stage_configs.get(eval_names[0], {})) if eval_names else {}
    raw_eval.pop("stage_name", None)
    raw_eval.pop("output_dir", None)
    return EvalConfig(**raw_eval)


def pilot_config(cfg, steps: int, output_dir: str | None = None, config_path: str | None = None, *,
                 chat_template: bool = True):
    """(pilot PipelineConfig, first training stage name, its kind, EvalConfig, derived values).

    `chat_template`: whether the evaluation renders prompts through a chat template (eval_renders_chat),
    so golden rows are trained the same way."""
    from lmpipeline.config.loader import load_config

    kinds = _kinds(cfg)
    train = [n for n in cfg.stages if method_for(n) is not None]
    if not train:
        raise UserError(f"a pilot needs a training stage ({', '.join(m.name for m in METHODS)}) in `stages`",
                        key="stages")
    first = train[0]
    eval_cfg = pilot_eval_config(cfg)

    data = cfg.model_dump()
    stage = dict(data["stage_configs"].get(first) or {})
    derived: dict = {f"stage_configs.{first}.max_steps": steps}
    stage["max_steps"] = steps
    if eval_cfg.golden_set and method_for(first).data == "supervised":  # a golden set is SFT rows, not preference pairs
        stage["dataset_name_or_path"] = eval_cfg.golden_set
        for k in ("dataset_format", "column_mapping", "eval_dataset_name_or_path", "max_samples"):
            stage.pop(k, None)
        stage["validation_split_ratio"] = 0.0
        if stage.get("eval_strategy", "no") != "no":
            stage["eval_strategy"] = "no"
            derived[f"stage_configs.{first}.eval_strategy"] = "no"
        if _golden_is_native(eval_cfg.golden_set):
            if chat_template:  # what the eval generates from: the prompt as a user turn, then the answer
                stage["dataset_format"] = "instruction_response"
                stage["column_mapping"] = {"instruction": "prompt", "response": "reference"}
                # the reference is what is learnt, as prompt_completion rows train only their completion
                stage["assistant_only_loss"] = True
                derived[f"stage_configs.{first}.assistant_only_loss"] = True
            else:  # raw text, as the eval feeds a model without a template
                stage["dataset_format"] = "prompt_completion"
                stage["column_mapping"] = {"completion": "reference"}
            derived[f"stage_configs.{first}.dataset_format"] = stage["dataset_format"]
            # Golden prompts without a reference are for generation only: they cannot be trained on.
            stage["on_invalid"] = "skip"
            derived[f"stage_configs.{first}.on_invalid"] = "skip"
        derived[f"stage_configs.{first}.dataset_name_or_path"] = eval_cfg.golden_set
    logging_steps = min(int(stage.get("logging_steps", 10)), max(1, steps // 10))
    stage["logging_steps"] = logging_steps
    stage["save_strategy"] = "no"
    derived[f"stage_configs.{first}.logging_steps"] = logging_steps
    derived[f"stage_configs.{first}.save_strategy"] = "no"
    base_out = cfg.output_dir or str(Path("outputs") / (Path(config_path).stem if config_path else "run"))
    out = output_dir or f"{base_out.rstrip('/')}-pilot"
    derived["output_dir"] = out
    data.update({"stages": [first], "stage_configs": {first: stage}, "output_dir": out})
    pilot = load_config(data=data)
    pilot._derived = {**cfg._derived, **derived, "pilot": True}
    return pilot, first, kinds[first], eval_cfg, derived


def eval_renders_chat(cfg, eval_cfg: EvalConfig) -> bool:
    """Whether the evaluation will render golden prompts through a chat template: the eval's or the first
    training stage's template setting, else the tokenizer's own (as the eval stage resolves it)."""
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.models.loading import load_tokenizer

    first = next(n for n in cfg.stages if method_for(n) is not None)
    stage = cfg.stage(first)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                               trust_remote_code=stage.trust_remote_code)
    template = gen.resolve_template(tokenizer, chat_template=eval_cfg.chat_template or stage.chat_template,
                                    chat_template_path=eval_cfg.chat_template_path or stage.chat_template_path)
    return template is not None


def run_pilot(cfg_path: str, overrides: list[str] | None = None, steps: int = 100, *, overwrite: bool = False,
              output_dir: str | None = None, max_new_tokens: int | None = None, print_fn=print) -> dict:
    """Train briefly, evaluate, report; returns the summary (also written to <pilot dir>/pilot.json).

    `max_new_tokens` overrides the eval stage's answer length (a pilot only needs a glimpse).
    """
    from lmpipeline.config.loader import load_config
    from lmpipeline.evaluate.stage import EvalStage, format_samples, format_table
    from lmpipeline.evaluate.generation import read_prompts
    from lmpipeline.pipeline import RUN_FILE, RunRecord, run_pipeline

    if steps <= 0:
        raise UserError(f"pilot steps must be positive, got {steps}", key="--pilot")
    cfg = load_config(cfg_path, overrides or [])
    eval_cfg = pilot_eval_config(cfg)
    chat = eval_renders_chat(cfg, eval_cfg) if eval_cfg.golden_set else True
    pilot, first, kind, eval_cfg, derived = pilot_config(cfg, steps, output_dir, cfg_path, chat_template=chat)
    for k, v in derived.items():
        print_fn(f"pilot: {k} = {v}")
    record = run_pipeline(pilot, config_path=str(cfg_path), overwrite=overwrite)
    out = Path(pilot.output_dir)
    entry = record["stages"][first]

    golden = eval_cfg.golden_set
    if not golden:
        src = pilot.stage(first).dataset_name_or_path
        golden = src if isinstance(src, str) else src[0].path
    eval_name = "pilot_eval"
    ecfg = eval_cfg.model_copy(update={"golden_set": golden, "stage_name": eval_name,
                                       "output_dir": str(out / eval_name),
                                       # the whole golden set, as the eval stage would; a glimpse of the training data
                                       "max_samples": eval_cfg.max_samples if eval_cfg.golden_set
                                       else eval_cfg.max_samples or DEFAULT_PROMPTS,
                                       "max_new_tokens": max_new_tokens or eval_cfg.max_new_tokens,
                                       "num_print_samples": 0, "models": None})
    final_dir = out / entry["final_dir"] if entry.get("final_dir") else None  # relative to the run folder
    ctx = RunContext(run_dir=out, base_model=cfg.model_name_or_path, tokenizer_path=cfg.tokenizer_name_or_path,
                     torch_dtype=cfg.torch_dtype,
                     completed=[StageOutput(first, kind, final_dir, bool(entry.get("adapter")), entry.get("metrics") or {})])
    result = EvalStage(ecfg).execute(ctx)

    # The pilot's eval is recorded like a pipeline stage, so `lmpipeline report` shows it.
    run = RunRecord(out / RUN_FILE, json.loads((out / RUN_FILE).read_text()))
    run.data["stages"][eval_name] = {"kind": "eval", "status": "done", "final_dir": None, "adapter": False,
                                     "metrics": result.metrics, "data": result.data, "notes": result.notes}
    run.save()
    try:  # the run wrote its report before this evaluation existed: draw it again with it
        write_report(out)
    except Exception as e:  # noqa: BLE001 - the report is a view; failing to draw it must not fail the pilot
        log.warning("report.html could not be rewritten: %s", e)

    results = json.loads((out / eval_name / "results.json").read_text())
    trend = loss_trend(out / first / "metrics.jsonl")
    summary = {"output_dir": str(out), "stage": first, "steps": steps, "trained_on": derived.get(
        f"stage_configs.{first}.dataset_name_or_path", "the stage's own data"), **trend,
        "eval": results["models"], "results": str(out / eval_name / "results.json"),
        "samples": str(out / eval_name / "samples.jsonl")}
    (out / "pilot.json").write_text(json.dumps(summary, indent=2, default=str))

    print_fn(f"pilot: {steps} step(s) of `{first}` in {out}")
    print_fn(format_table(results["models"]))
    prompts = read_prompts(golden, max_samples=min(ecfg.max_samples or DEFAULT_PROMPTS, 3),
                           system_prompt=ecfg.system_prompt)
    outputs = _outputs(out / eval_name / "samples.jsonl", len(prompts))
    for line in format_samples(prompts, outputs, len(prompts)):
        print_fn(line)
    if trend["loss_fell"] is None:
        print_fn(f"loss: only {trend['logged_points']} logged value(s); log more often to see a trend")
    else:
        verdict = "fell" if trend["loss_fell"] else "did NOT fall: check the learning rate, the data and the masks"
        print_fn(f"loss {verdict}: {trend['first_loss']:.4f} (step {trend['first_step']}) -> "
                 f"{trend['last_loss']:.4f} (step {trend['last_step']})")
    return summary


def _outputs(samples_file: Path, n: int) -> dict:
    from lmpipeline.evaluate.generation import Generation

    outputs: dict[str, list] = {}
    for line in samples_file.read_text().splitlines()[:n]:
        rec = json.loads(line)
        for label, text in rec["outputs"].items():
            outputs.setdefault(label, []).append(Generation(text, rec["num_tokens"][label], True))
    return outputs


__all__ = ["run_pilot", "pilot_config", "pilot_eval_config", "eval_renders_chat", "loss_trend"]
