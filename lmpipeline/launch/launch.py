"""`lmpipeline launch CONFIG --gpus N ...`: run `lmpipeline run CONFIG` on N processes per node.

Supports:
  - strategies ddp (default), fsdp2, zero2, zero3: accelerate config files that ship with the project
    (lmpipeline/launch/presets/*.yaml), or the user's own with --accelerate-config FILE;
  - one node or several (--nodes M --node-rank R --main-address HOST --main-port PORT; the node rank
    defaults to $SLURM_NODEID, then $NODE_RANK, so one command line serves every node under srun);
  - --cpu: N processes on the CPU with the gloo backend, through torchrun (accelerate launch starts
    several CPU processes only through MPI). For testing the multi-process path without GPUs; DDP only.
  - --dry-run prints the command; otherwise it runs it and returns its exit status.

Preemption: SIGUSR1 or SIGTERM sent to this launcher is forwarded as SIGUSR1 to the training
processes (torchrun starts them in sessions of their own, so they are found as descendants); they
checkpoint at the next step boundary and exit. The agent in between (accelerate/torchrun) is
started with SIGUSR1 ignored, so that it does not die of the signal before its workers have saved,
and it reports any worker's non-zero exit as 1, so the launcher reads run.json instead: when it
forwarded a stop signal and a stage there is "preempted", it exits with PREEMPTED_EXIT_CODE (75),
the code the SLURM script (lmpipeline/launch/slurm.py) requeues on.

Assumes: the same lmpipeline install and config path on every node, and for several nodes an
output_dir on a filesystem that every node shares (checkpoints are written by rank 0 and read by all).
Raises UserError for an unknown strategy, --cpu with a sharded strategy, counts below 1, a node
rank outside the node count, several nodes without --main-address, a missing config or preset.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline.errors import UserError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"
STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
DEFAULT_PORT = 29500
# Kept here rather than imported from lmpipeline.train.loop so that the launcher starts without
# importing torch; tests/unit/launch checks that the two agree.
PREEMPTED_EXIT_CODE = 75


def preset_path(strategy: str) -> Path:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy `{strategy}`", key="--strategy", hint=f"choose one of {', '.join(STRATEGIES)}")
    path = PRESET_DIR / f"{strategy}.yaml"
    if not path.is_file():
        raise UserError(f"the accelerate preset {path} is missing from this install", key="--strategy",
                        hint="reinstall lmpipeline (the presets ship as package data)")
    return path


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


@dataclass
class LaunchSpec:
    config: str
    gpus: int = 1
    nodes: int = 1
    node_rank: int | None = None
    main_address: str | None = None
    main_port: int = DEFAULT_PORT
    strategy: str = "ddp"
    cpu: bool = False
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    overwrite: bool = False
    accelerate_config: str | None = None
    python: str = sys.executable

    def check(self) -> None:
        if self.gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {self.gpus}", key="--gpus")
        if self.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {self.nodes}", key="--nodes")
        if self.node_rank is None:
            self.node_rank = _env_int("SLURM_NODEID", "NODE_RANK", default=0)
        if not 0 <= self.node_rank < self.nodes:
            raise UserError(f"node rank {self.node_rank} is outside 0..{self.nodes - 1}", key="--node-rank")
        if self.nodes > 1 and not self.main_address:
            raise UserError("several nodes need the first node's address", key="--main-address",
                            hint="pass --main-address HOST (under SLURM: scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)")
        if self.cpu and self.strategy != "ddp":
            raise UserError(f"--cpu runs DDP over gloo; {self.strategy} needs GPUs", key="--strategy")
        if not Path(self.config).is_file():
            raise UserError(f"config file `{self.config}` does not exist", key="CONFIG")
        if self.accelerate_config and not Path(self.accelerate_config).is_file():
            raise UserError(f"accelerate config `{self.accelerate_config}` does not exist", key="--accelerate-config")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")


def run_args(spec: LaunchSpec) -> list[str]:
    """`-m lmpipeline run CONFIG ...`: what every training process runs."""
    args = ["-m", "lmpipeline", "run", spec.config]
    for item in spec.overrides:
        args += ["--set", item]
    if spec.resume:
        args.append("--resume")
    if spec.overwrite:
        args.append("--overwrite")
    return args


def _tool(python: str, script: str, module: list[str], *sub: str) -> list[str]:
    """The console script installed beside `python` (what people type), else `python -m module`."""
    exe = Path(python).parent / script
    return [str(exe), *sub] if exe.is_file() else [python, "-m", *module]


def build_command(spec: LaunchSpec) -> list[str]:
    """The full command line: accelerate launch with a preset (GPU), or torchrun (--cpu)."""
    spec.check()
    total = spec.gpus * spec.nodes
    if spec.cpu:
        cmd = _tool(spec.python, "torchrun", ["torch.distributed.run"])
        cmd += ["--nproc_per_node", str(spec.gpus), "--nnodes", str(spec.nodes), "--node_rank", str(spec.node_rank),
                "--master_addr", spec.main_address or "127.0.0.1", "--master_port", str(spec.main_port)]
        return cmd + run_args(spec)
    cmd = _tool(spec.python, "accelerate", ["accelerate.commands.launch"], "launch")
    cmd += ["--config_file", spec.accelerate_config or str(preset_path(spec.strategy)),
            "--num_processes", str(total), "--num_machines", str(spec.nodes), "--machine_rank", str(spec.node_rank),
            "--main_process_port", str(spec.main_port)]
    if spec.main_address:
        cmd += ["--main_process_ip", spec.main_address]
    return cmd + run_args(spec)


def child_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(os.environ)
    if spec.cpu:
        # Workers must not pick up a GPU (and NCCL) on a machine that has one.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def output_dir_of(spec: LaunchSpec) -> Path | None:
    """Where the run writes run.json (the config's output_dir, or the default derived from its name)."""
    from lmpipeline.config.loader import load_config

    try:
        cfg = load_config(spec.config, spec.overrides)
    except Exception:  # noqa: BLE001 - the training processes report config errors themselves
        return None
    return Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / Path(spec.config).stem


def was_preempted(run_dir: Path | None) -> bool:
    if run_dir is None:
        return False
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return any(s.get("status") == "preempted" for s in record.get("stages", {}).values())


def _descendants(pid: int) -> list[int]:
    import psutil  # an accelerate dependency

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _ignore_usr1() -> None:
    # The agent (accelerate/torchrun) would die of SIGUSR1's default action; the workers install
    # their own handler (lmpipeline.train.loop._StopSignal), which replaces this inherited SIG_IGN.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_command(cmd: list[str], *, env: dict[str, str] | None = None, run_dir: Path | None = None) -> int:
    """Run the launcher command, forwarding stop signals to the workers; see the module docstring."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr1)
    forwarded = {"signal": None}

    def forward(signum, frame):
        forwarded["signal"] = signum
        targets = _descendants(proc.pid)
        log.warning("launcher: signal %s received; asking %d training process(es) to checkpoint and stop",
                    signum, len(targets))
        for pid in targets:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                continue  # the workers got the same Ctrl-C and stop themselves; wait for them
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if forwarded["signal"] is not None and rc != 0 and was_preempted(run_dir):
        return PREEMPTED_EXIT_CODE
    return rc


def launch(spec: LaunchSpec, *, dry_run: bool = False) -> int:
    cmd = build_command(spec)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    return run_command(cmd, env=child_env(spec), run_dir=output_dir_of(spec))
