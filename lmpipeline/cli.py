"""Command line: parse, call, print. Every user mistake ends as one readable message and exit code 2.

Anything else that escapes a command (a bug, or a case no check foresaw) ends as one paragraph naming
the command, its input and the stage, with exit code INTERNAL_ERROR_EXIT_CODE; the traceback goes to
the failing run's run.log (or, outside a stage, a crash log file the message names), never to the console.
SIGTERM outside a training step is handled like Ctrl-C, so a stopped stage is recorded as interrupted.

    lmpipeline run CONFIG [--set KEY=VALUE ...] [--overwrite | --resume]
    lmpipeline validate CONFIG [--set ...] [--config-only]
    lmpipeline data inspect CONFIG [--stage S] [-n N] [--jsonl]
    lmpipeline eval | generate | chat | merge | package | report ...   (lmpipeline/commands/)
    python -m lmpipeline --config CONFIG [--set ...]        (`run`, as TRL-style scripts are started)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from lmpipeline import __version__
from lmpipeline.commands import positive_int
from lmpipeline.config.errors import ConfigError
from lmpipeline.errors import UserError
from lmpipeline.numbers import fmt_number

# EX_SOFTWARE: an internal error, told apart from a user mistake (2) and a stopped run (75, 130).
INTERNAL_ERROR_EXIT_CODE = 70


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun and accelerate set RANK), or a process run on its own."""
    return os.environ.get("RANK", "0") == "0"


def console_handler(level: int) -> logging.Handler:
    """The terminal's log handler. Under `launch` every process logs; the terminal gets the main process's
    lines once, and the others' only when they warn (each keeps its full log in <run>/logs/rank-R.log)."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if is_main_process() else logging.WARNING)
    return console


def _setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[console_handler(level)])
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_config_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("config", help="YAML config (the pipeline form, or a sectioned model/lora/training/dataset config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage_configs.sft.learning_rate=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipeline", description="Post-train Hugging Face causal LMs from one YAML config.")
    parser.add_argument("--version", action="version", version=f"lmpipeline {__version__}")
    parser.add_argument("--config", help="run this config (same as `lmpipeline run CONFIG`)")
    parser.add_argument("--set", dest="top_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --config)")
    parser.add_argument("--overwrite", dest="top_overwrite", action="store_true", help="(with --config) replace an existing run")
    parser.add_argument("--resume", dest="top_resume", action="store_true", help="(with --config) continue an existing run")
    parser.add_argument("--allow-changed-config", dest="top_allow_changed", action="store_true",
                        help="(with --config --resume) continue with a changed config or data")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the stages of a config", description="Run every stage of CONFIG in order.")
    _add_config_args(run)
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    run.add_argument("--stages", type=_stage_list, metavar="NAME[,NAME...]",
                     help="run only these of the config's stages, in the config's order (e.g. --stages sft or "
                          "--stages sft,dpo); with --resume, a later stage starts from the run's earlier ones")
    run.add_argument("--allow-changed-config", action="store_true",
                     help="with --resume: continue even though the config or the data files changed (recorded in run.json)")

    val = sub.add_parser("validate", help="check a config and its data without training",
                         description="Check the config, then the model reference and every data row; no training.")
    _add_config_args(val)
    val.add_argument("--config-only", action="store_true", help="check the config schema only (no model or data)")

    data = sub.add_parser("data", help="look at data as the model will see it")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    insp = data_sub.add_parser("inspect", help="render examples with the trained tokens marked",
                               description="Show examples of a stage as tokens, trained tokens highlighted.")
    _add_config_args(insp)
    insp.add_argument("--stage", help="stage name (default: the first training stage)")
    insp.add_argument("-n", type=positive_int, default=3, help="number of examples (default 3)")
    insp.add_argument("--jsonl", action="store_true", help="one JSON object per example: input_ids and labels")
    insp.add_argument("--packed", action="store_true", help="show one packed batch as well")

    from lmpipeline.commands import (bench_cmd, chat_cmd, estimate_cmd, eval_cmd, generate, launch_cmd, merge_cmd,
                                     package_cmd, report_cmd, slurm_cmd)

    for module in (eval_cmd, generate, chat_cmd, merge_cmd, package_cmd, report_cmd, launch_cmd, slurm_cmd, estimate_cmd,
                   bench_cmd):
        module.add_parser(sub)
    run.add_argument("--pilot", nargs="?", const=100, type=positive_int, metavar="STEPS",
                     help="pilot: the first training stage for STEPS steps (default 100) on the golden "
                          "set, then eval, sample generations and whether the loss fell")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    previous = _sigterm_as_interrupt()
    try:
        return _guarded(parser, args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (the training loop installs its own checkpointing handler)."""
    def _handle(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        return None


def _guarded(parser, args, argv) -> int:
    from lmpipeline.data.types import DataError

    try:
        return _dispatch(parser, args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.command == "run" or args.config:
            print("interrupted: the last complete checkpoint can be continued with --resume", file=sys.stderr)
        else:
            print(f"interrupted: `lmpipeline {args.command}` stopped before finishing; its output was not written "
                  "(only complete outputs are ever put in place), so run the command again", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last resort: a paragraph for the user, the traceback to a log
        print(_internal_error_message(e, args, argv), file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE


def _internal_error_message(error: Exception, args, argv) -> str:
    command = "lmpipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    log_path = _write_traceback(error)
    where = getattr(error, "lmpipeline_stage", None)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return (f"error: internal error{f' in {where}' if where else ''} while running `{command}`: "
            f"{type(error).__name__}{f': {first}' if first else ''}. This is a bug in lmpipeline or a case it does not "
            f"check yet, not something you did wrong; the traceback is in {log_path}. Please report it with that file.")


def _write_traceback(error: Exception) -> str:
    """Append the traceback to the run's run.log (the failing stage says which), else to a crash log."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    run_log = getattr(error, "lmpipeline_log", None)
    if run_log is not None:
        try:
            with open(run_log, "a", encoding="utf-8") as f:
                f.write(f"internal error:\n{text}")
            return str(run_log)
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="lmpipeline-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _dispatch(parser, args) -> int:
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.command is None:
        if not args.config:
            parser.print_help()
            return 2
        return _run(args.config, args.top_overrides, overwrite=args.top_overwrite, resume=args.top_resume,
                    allow_changed_config=args.top_allow_changed)
    if args.command == "run":
        if args.pilot:
            if args.stages is not None:
                raise UserError("--stages does not combine with --pilot (a pilot runs the first training stage)",
                                key="--stages")
            from lmpipeline.evaluate.pilot import run_pilot

            run_pilot(args.config, args.overrides, steps=args.pilot, overwrite=args.overwrite)
            return 0
        return _run(args.config, args.overrides, overwrite=args.overwrite, resume=args.resume,
                    allow_changed_config=args.allow_changed_config, stages=args.stages)
    if args.command == "validate":
        from lmpipeline.commands.validate import validate_command

        return validate_command(args.config, args.overrides, config_only=args.config_only)
    if args.command == "data":
        if args.data_command != "inspect":
            parser.parse_args(["data", "--help"])
        from lmpipeline.commands.inspect import inspect_command

        return inspect_command(args.config, args.overrides, stage=args.stage, n=args.n, as_jsonl=args.jsonl,
                               packed=args.packed)
    parser.print_help()
    return 2


def _stage_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def stage_summary(name: str, entry: dict) -> str:
    """One line of the end-of-run summary: where the stage's result is, and its numbers (an eval's beside
    the base model's): `eval: exact_match=0.303 (base 0), ... -> outputs/x/eval/results.json`."""
    notes = entry.get("notes") or {}
    where = notes.get("archive") or notes.get("results") or entry.get("final_dir")
    metrics = entry.get("metrics") or {}
    shown = []
    for key, value in metrics.items():
        if key.startswith("base_") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        base = metrics.get(f"base_{key}")
        shown.append(f"{key}={fmt_number(value)}" + (f" (base {fmt_number(base)})" if isinstance(base, (int, float)) else ""))
    return f"  {name}: " + ", ".join(shown) + (" -> " if shown and where else "") + (str(where) if where else "")


def _run(config: str, overrides: list[str], *, overwrite: bool, resume: bool, allow_changed_config: bool = False,
         stages: list[str] | None = None) -> int:
    from lmpipeline.config.loader import load_config, select_stages
    from lmpipeline.pipeline import from_run, run_pipeline

    if allow_changed_config and not resume:
        raise UserError("applies only with --resume (it lets a resumed run go on with a changed config or data)",
                        key="--allow-changed-config")
    cfg = load_config(config, overrides)
    if stages is not None:
        cfg = select_stages(cfg, stages)
    record = run_pipeline(cfg, config_path=config, overwrite=overwrite, resume=resume,
                          allow_changed_config=allow_changed_config)
    if not is_main_process():
        return 0  # the main process prints the summary, once
    out = record["config"].get("output_dir") or record.get("derived", {}).get("output_dir")
    print(f"done: {len(record['stages'])} stage(s); outputs in {out}")
    for name, st in record["stages"].items():
        final = st.get("final_dir")
        shown = dict(st, final_dir=str(from_run(Path(out), final))) if final and out else st  # run.json is relative
        print(stage_summary(name, shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
