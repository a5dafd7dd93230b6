"""`lmpipeline slurm CONFIG --nodes M --gpus-per-node G [...]` and `lmpipeline slurm --setup`.

Writes an sbatch script (training with preemption and optional requeue, or the venv set-up of
a cluster's environment), prints its path, and submits it with --submit; see lmpipeline/launch/slurm.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmpipeline.errors import UserError
from lmpipeline.launch.launch import STRATEGIES
from lmpipeline.launch.slurm import SlurmSpec, script_dir, setup_script, submit, training_script, write_script


def slurm_command(args) -> int:
    if not args.setup and not args.config:
        raise UserError("give a CONFIG to train, or --setup for the venv set-up script")
    spec = SlurmSpec(config=args.config or "", nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                     cpus_per_task=args.cpus_per_task, mem=args.mem, job_name=args.job_name,
                     output_dir=args.output_dir, venv=args.venv, strategy=args.strategy, overrides=args.overrides,
                     requeue=args.requeue, online=args.online, cpu=args.cpu,
                     collective_timeout_s=args.collective_timeout, sbatch_extra=args.sbatch, modules=args.module)
    if args.setup:
        text = setup_script(spec, install=args.install)
        path = write_script(text, script_dir(spec, setup=True) / "setup_venv.sbatch")
    else:
        text = training_script(spec)  # checks the spec and the config first
        path = write_script(text, script_dir(spec) / f"{Path(args.config).stem}.sbatch")
    print(f"wrote {path}")
    if args.submit:
        print(f"submitted: job {submit(path)}")
    else:
        print(f"submit with: sbatch {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "slurm", help="write (and submit) a SLURM sbatch script: multi-node training, preemption, requeue",
        description="Write an sbatch script that trains CONFIG on --nodes x --gpus-per-node GPUs with "
                    "`lmpipeline launch`, checkpoints on SLURM's USR1 warning and (with --requeue) requeues "
                    "itself; or, with --setup, the script that creates the venv.")
    p.add_argument("config", nargs="?", help="the pipeline YAML config (not needed with --setup)")
    p.add_argument("--setup", action="store_true", help="write setup_venv.sbatch: create --venv and install lmpipeline")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, metavar="G", help="GPUs, one process each, per node (default 1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="accelerate preset (default ddp)")
    for flag, hint in (("partition", "NAME"), ("time", "HH:MM:SS"), ("account", "NAME"), ("qos", "NAME"),
                       ("mem", "SIZE"), ("job-name", "NAME")):
        p.add_argument(f"--{flag}", metavar=hint, help=f"#SBATCH --{flag}")
    p.add_argument("--cpus-per-task", type=int, metavar="N", help="#SBATCH --cpus-per-task")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--constraint=a100 (repeatable)")
    p.add_argument("--module", action="append", default=[], metavar="NAME", help="`module load NAME` first (repeatable)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="where the script and the SLURM logs go (default: the run's own folder, <output_dir>/slurm; "
                        "with --setup, outputs/slurm-setup)")
    p.add_argument("--venv", metavar="PATH", help="virtual environment to activate (--setup: to create)")
    p.add_argument("--install", metavar="SPEC", help="(--setup) what pip installs (default: this checkout, or lmpipeline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to the run (repeatable)")
    p.add_argument("--requeue", action="store_true",
                   help="on USR1 (time limit or preemption): checkpoint, then `scontrol requeue` the job")
    p.add_argument("--online", action="store_true", help="do not set HF_HUB_OFFLINE=1 (the job may download)")
    p.add_argument("--collective-timeout", type=int, default=1800, metavar="S",
                   help="LMPIPELINE_COLLECTIVE_TIMEOUT_S: fail a collective stuck this long (default 1800)")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), for testing the script without GPUs")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.set_defaults(func=slurm_command)
    return p
