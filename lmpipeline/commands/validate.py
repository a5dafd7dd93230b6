"""`lmpipeline validate CONFIG`: the config, the model reference and every data row, no training.

Also checks what the run needs from this machine (a CUDA GPU for 4/8-bit, bitsandbytes, liger-kernel,
the trackers' packages: lmpipeline/plan/requirements.py), as `run` does before it tokenises; --config-only
prints those as notes and still exits 0.

Exit 0 when a run would start; 1 when the data has problems the run would stop on (each printed
as file:line: reason, then a summary); 2 for config errors (raised as ConfigError to the CLI).
"""

from __future__ import annotations

from lmpipeline.config.loader import load_config
from lmpipeline.data import validate
from lmpipeline.methods import method_for
from lmpipeline.models.loading import load_tokenizer
from lmpipeline.pipeline import check_output_paths, check_references
from lmpipeline.plan.requirements import check_requirements, missing_requirements


def validate_command(config: str, overrides: list[str], *, config_only: bool = False) -> int:
    cfg = load_config(config, overrides)
    print(f"config OK: {config} — stages {', '.join(cfg.stages)}")
    for k, v in cfg._derived.items():
        print(f"  derived: {k} = {v}")
    if config_only:
        for missing in missing_requirements(cfg):  # the config is fine; this machine could not run it
            print(f"  note: on this machine, {missing}")
        return 0
    check_references(cfg)
    check_requirements(cfg)
    check_output_paths(cfg, config)

    failed = False
    for name in cfg.stages:
        method = method_for(name)
        if method is None:
            continue  # eval/merge/package read their inputs from earlier stages
        stage = cfg.stage(name)
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, eos_token=stage.eos_token,
                                   pad_token=stage.pad_token, trust_remote_code=stage.trust_remote_code)
        # Read leniently (on_invalid: skip) so that every problem is listed, not just the first.
        fmts, report = method.validate_data(stage, tokenizer)
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

