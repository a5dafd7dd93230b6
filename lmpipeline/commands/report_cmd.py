"""`lmpipeline report RUN_DIR [--output FILE]`: write the run's self-contained report.html."""

from __future__ import annotations

import argparse


def report_command(run_dir: str, *, output: str | None = None) -> int:
    from lmpipeline.report.html import write_report

    path = write_report(run_dir, output)
    print(f"report: {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="write report.html for a run",
                              description="Write one self-contained HTML page with the run's curves, eval "
                                          "table and sample generations.")
    p.add_argument("run_dir", help="run folder (holds run.json)")
    p.add_argument("--output", metavar="FILE", help="where to write (default RUN_DIR/report.html)")
    p.set_defaults(func=lambda a: report_command(a.run_dir, output=a.output))
    return p
