"""`lmpipeline launch CONFIG --gpus N [...]`: `lmpipeline run CONFIG` on N processes per node.

Builds `accelerate launch --config_file <preset> ... -m lmpipeline run CONFIG` (or torchrun with
--cpu), prints it, and runs it unless --dry-run; see lmpipeline/launch/launch.py.
Exit status: the run's, or 75 when a stop signal made it checkpoint and stop (resume with --resume).
"""

from __future__ import annotations

import argparse

from lmpipeline.launch.launch import DEFAULT_PORT, STRATEGIES, LaunchSpec, launch


def launch_command(args) -> int:
    spec = LaunchSpec(config=args.config, gpus=args.gpus, nodes=args.nodes, node_rank=args.node_rank,
                      main_address=args.main_address, main_port=args.main_port, strategy=args.strategy, cpu=args.cpu,
                      overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
                      accelerate_config=args.accelerate_config)
    return launch(spec, dry_run=args.dry_run)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch", help="run a config on several GPUs or nodes (accelerate: DDP, FSDP2, DeepSpeed ZeRO)",
        description="Run `lmpipeline run CONFIG` on --gpus processes per node with an accelerate preset "
                    "(lmpipeline/launch/presets). Several nodes: run the same command on each with --nodes, "
                    "--main-address of the first node and its --node-rank (default $SLURM_NODEID).")
    p.add_argument("config", help="the pipeline YAML config")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="processes (GPUs) per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (default $SLURM_NODEID, $NODE_RANK or 0)")
    p.add_argument("--main-address", metavar="HOST", help="address of the first node (needed with --nodes > 1)")
    p.add_argument("--main-port", type=int, default=DEFAULT_PORT, metavar="PORT", help=f"rendezvous port (default {DEFAULT_PORT})")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="ddp (default), fsdp2, zero2 or zero3 (DeepSpeed, optional extra)")
    p.add_argument("--accelerate-config", metavar="FILE", help="your own accelerate config instead of the preset")
    p.add_argument("--cpu", action="store_true", help="CPU processes over gloo (torchrun), for trying the multi-process path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (passed to every process; repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (starts fresh when there is none)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=launch_command)
    return p
