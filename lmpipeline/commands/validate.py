"""`lmpipeline validate CONFIG`: the config, the model reference and every data row, no training.

Exit 0 when a run would start; 1 when the data has problems the run would stop on (each printed
as file:line: reason, then a summary); 2 for config errors (raised as ConfigError to the CLI).
"""

from __future__ import annotations

from lmpipeline.config.loader import load_config
from lmpipeline.config.schema import STAGE_ALIASES, TRAINING_KINDS


def validate_command(config: str, overrides: list[str], *, config_only: bool = False) -> int:
    from lmpipeline.pipeline import check_output_paths, check_references

    cfg = load_config(config, overrides)
    print(f"config OK: {config} — stages {', '.join(cfg.stages)}")
    for k, v in cfg._derived.items():
        print(f"  derived: {k} = {v}")
    if config_only:
        return 0
    check_references(cfg)
    check_output_paths(cfg, config)

    from lmpipeline.data import validate
    from lmpipeline.data.build import load_examples, needs_template, chat_template_for, tokenize_sft
    from lmpipeline.models.loading import load_tokenizer

    failed = False
    for name in cfg.stages:
        if STAGE_ALIASES[name] not in TRAINING_KINDS:
            continue  # eval/merge/package read their inputs from earlier stages
        stage = cfg.stage(name)
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, eos_token=stage.eos_token,
                                   pad_token=stage.pad_token, trust_remote_code=stage.trust_remote_code)
        # Read with on_invalid=skip so that every problem is listed, not just the first.
        examples, eval_examples, report, fmts = load_examples(stage, on_invalid="skip")
        if STAGE_ALIASES[name] == "sft":
            template = chat_template_for(stage, tokenizer) if needs_template(examples) else None
            lenient = stage.model_copy(update={"on_invalid": "skip", "on_overlong": "truncate" if stage.on_overlong == "error" else stage.on_overlong})
            tokenize_sft(examples + (eval_examples or []), lenient, tokenizer, template, report)
        print(f"[{name}] data: format {'+'.join(fmts)}; {report.summary()}")
        if report.issues:
            print(validate.format_report(report, max_issues=50))
            if stage.on_invalid == "error":
                failed = True
                print(f"[{name}] a run would stop on these rows (on_invalid: error); fix them or set on_invalid: skip")
        if report.truncated and stage.on_overlong == "error":
            failed = True
            print(f"[{name}] {report.truncated} examples exceed max_seq_length={stage.max_seq_length} (on_overlong: error)")
    if failed:
        return 1
    print("validate: OK")
    return 0

