"""`lmpipeline slurm`: sbatch scripts for training on a SLURM cluster, and for setting up its venv.

`lmpipeline slurm CONFIG --nodes M --gpus-per-node G ...` writes <output-dir>/<config>.sbatch, where
<output-dir> defaults to the run's own folder, <config's output_dir>/slurm (nothing lands in the checkout):
  - #SBATCH lines: one task per node, G GPUs per node, partition/time/account/qos when given,
    the job log in <output-dir>/logs (appended across requeues), `--signal=B:USR1@300`;
  - set-up: cd to the submit-time working folder, activate --venv, HF_HUB_OFFLINE=1 unless
    --online, TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (and the older NCCL_ASYNC_ERROR_HANDLING=1) so that a
    failed collective ends the job instead of hanging it, LMPIPELINE_COLLECTIVE_TIMEOUT_S and
    LMPIPELINE_HEARTBEAT_S (see lmpipeline/train/runtime.py and lmpipeline/train/heartbeat.py);
  - the rendezvous on the first node: MAIN_ADDR from `scontrol show hostnames $SLURM_JOB_NODELIST`,
    a port derived from the job id (two jobs sharing a node do not collide);
  - `srun` starting one `lmpipeline launch` per node (which starts G training processes, with its node
    rank from SLURM_NODEID), a log per node from srun plus one per rank in the run folder
    (run.log, logs/rank-R.log);
  - `lmpipeline run CONFIG --resume` always: a requeued or resubmitted job continues from the
    latest checkpoint, and a first run (empty or missing output_dir) starts from step 0;
  - preemption: SLURM sends USR1 to the batch shell 300 s before the time limit (or preemption);
    the trap forwards it to srun, which forwards it to every node's launcher, which forwards it to
    the training processes; they agree on a step, save a checkpoint and exit 75. With --requeue the
    script then calls `scontrol requeue $SLURM_JOB_ID`; without it, it exits 75 and says how to
    continue.
`lmpipeline slurm --setup [--venv PATH]` writes <output-dir>/setup_venv.sbatch (default outputs/slurm-setup): create the venv,
pip install lmpipeline (this checkout when it is one, else the package) with the gpu extra, check it.
--submit runs sbatch on the written script and prints the job id.

Assumes: bash, srun/scontrol/sbatch on PATH in the job; the same paths on every node; output_dir
on a filesystem that every node shares when there are several nodes.
Raises UserError for counts below 1, a missing config, or sbatch failing.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline.errors import UserError
from lmpipeline.launch.launch import PREEMPTED_EXIT_CODE, STRATEGIES

# Where the script and the SLURM logs go unless --output-dir says: inside the run's own folder, so that
# nothing lands in the checkout the job is submitted from; the venv set-up job has no run, and uses a
# folder under outputs/ (which a checkout ignores).
RUN_SCRIPT_SUBDIR = "slurm"
SETUP_OUTPUT_DIR = Path("outputs") / "slurm-setup"
SIGNAL_LEAD_S = 300


@dataclass
class SlurmSpec:
    config: str
    nodes: int = 1
    gpus_per_node: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    job_name: str | None = None
    output_dir: str | None = None  # None: script_dir() decides
    venv: str | None = None
    strategy: str = "ddp"
    overrides: list[str] = field(default_factory=list)
    requeue: bool = False
    online: bool = False
    cpu: bool = False
    collective_timeout_s: int = 1800
    heartbeat_s: int = 60
    signal_lead_s: int = SIGNAL_LEAD_S
    workdir: str = field(default_factory=os.getcwd)
    sbatch_extra: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy `{self.strategy}`", key="--strategy", hint=f"choose one of {', '.join(STRATEGIES)}")
        if not Path(self.config).is_file():
            raise UserError(f"config file `{self.config}` does not exist", key="CONFIG")


def _q(value) -> str:
    return shlex.quote(str(value))


def _sbatch_common(spec, job_name: str, log_dir: Path) -> list[str]:
    lines = [f"#SBATCH --job-name={job_name}"]
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account),
                        ("qos", spec.qos), ("cpus-per-task", spec.cpus_per_task), ("mem", spec.mem)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH --output={log_dir}/%x-%j.out", "#SBATCH --open-mode=append"]
    lines += [f"#SBATCH {extra}" for extra in spec.sbatch_extra]
    return lines


def _environment(spec) -> list[str]:
    lines = [f"cd {_q(spec.workdir)}"]
    lines += [f"module load {_q(m)}" for m in spec.modules]
    if spec.venv:
        lines.append(f"source {_q(Path(spec.venv) / 'bin' / 'activate')}")
    return lines


def run_dir_of(spec: SlurmSpec) -> Path:
    """The run folder the job will write (checked now, so a broken config fails before it queues)."""
    from lmpipeline.config.loader import load_config

    cfg = load_config(spec.config, spec.overrides)
    out = Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / Path(spec.config).stem
    return out if out.is_absolute() else Path(spec.workdir) / out


def script_dir(spec: SlurmSpec, *, setup: bool = False) -> Path:
    """The folder for the script and its logs: --output-dir, else <run folder>/slurm (the venv set-up job:
    outputs/slurm-setup under the working folder)."""
    if spec.output_dir:
        return Path(spec.output_dir).resolve()
    if setup:
        return (Path(spec.workdir) / SETUP_OUTPUT_DIR).resolve()
    return (run_dir_of(spec) / RUN_SCRIPT_SUBDIR).resolve()


def training_script(spec: SlurmSpec) -> str:
    spec.check()
    run_dir = run_dir_of(spec)
    out = script_dir(spec)
    log_dir = out / "logs"
    config = str(Path(spec.config).resolve())
    job_name = spec.job_name or f"lmpipeline-{Path(spec.config).stem}"
    gpus = "" if spec.cpu else f"\n#SBATCH --gpus-per-node={spec.gpus_per_node}"
    header = "\n".join([
        "#!/bin/bash",
        f"# Written by `lmpipeline slurm` on {_dt.date.today().isoformat()}: lmpipeline run {config}",
        f"# on {spec.nodes} node(s) x {spec.gpus_per_node} process(es), strategy {spec.strategy}. Submit with: sbatch <this file>",
        f"# USR1 arrives {spec.signal_lead_s}s before the time limit: the trainers checkpoint and exit {PREEMPTED_EXIT_CODE}; "
        + ("the job requeues itself and resumes." if spec.requeue else "resubmit this file to resume."),
        *_sbatch_common(spec, job_name, log_dir),
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1" + gpus,
        f"#SBATCH --signal=B:USR1@{spec.signal_lead_s}",
    ] + (["#SBATCH --requeue"] if spec.requeue else []))
    launch_args = [config, "--gpus", str(spec.gpus_per_node), "--nodes", str(spec.nodes), "--strategy", spec.strategy]
    if spec.cpu:
        launch_args.append("--cpu")
    for item in spec.overrides:
        launch_args += ["--set", item]
    launch_line = " ".join(_q(a) for a in launch_args)
    offline = "" if spec.online else "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1\n"
    requeue = ('''    echo "[lmpipeline] checkpoint saved: requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0''' if spec.requeue else f'''    echo "[lmpipeline] checkpoint saved: submit this script again to resume (sbatch $0)"
    exit {PREEMPTED_EXIT_CODE}''')
    body = f'''
{chr(10).join(_environment(spec))}
set -uo pipefail  # after `module`/`source`, which may read unset variables; not -e: rc is examined below
{offline}# A collective that fails or times out ends the job (with the stalled rank named in the logs)
# instead of hanging it until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1
export LMPIPELINE_COLLECTIVE_TIMEOUT_S=${{LMPIPELINE_COLLECTIVE_TIMEOUT_S:-{spec.collective_timeout_s}}}
export LMPIPELINE_HEARTBEAT_S=${{LMPIPELINE_HEARTBEAT_S:-{spec.heartbeat_s}}}
export LMPIPELINE_NO_PROGRESS=1
LMPIPELINE_CMD=${{LMPIPELINE_CMD:-python -m lmpipeline}}  # split into words on purpose

MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PORT=${{MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
mkdir -p {_q(log_dir)}
echo "[lmpipeline] job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST; rendezvous $MAIN_ADDR:$MAIN_PORT"

# One launcher per node; each starts its processes and reads its node rank from SLURM_NODEID.
# --resume: a requeued job continues from the latest checkpoint; a first run starts from step 0.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append --output={_q(log_dir)}/%x-%j-node%n.log \\
    $LMPIPELINE_CMD launch {launch_line} \\
    --main-address "$MAIN_ADDR" --main-port "$MAIN_PORT" --resume &
SRUN_PID=$!

INTERRUPTED=0
STOP_REQUESTED=0
on_signal() {{
    INTERRUPTED=1
    STOP_REQUESTED=1
    echo "[lmpipeline] $1 received: asking the trainers to checkpoint and stop"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true  # srun forwards it to every node's launcher
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

while :; do
    INTERRUPTED=0
    wait "$SRUN_PID"
    rc=$?
    # A trap cuts `wait` short (status > 128) while the step still runs: wait again.
    if [ "$INTERRUPTED" = 1 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    if [ "$INTERRUPTED" = 1 ] && [ "$rc" -gt 128 ]; then wait "$SRUN_PID"; rc=$?; fi
    break
done

# 75: every node checkpointed. With several nodes srun may report another status for nodes it
# stopped itself (--kill-on-bad-exit) once the first exited 75: run.json records the preemption.
if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ] || {{ [ "$STOP_REQUESTED" = 1 ] && grep -qs '"status": "preempted"' {_q(run_dir / "run.json")}; }}; then
{requeue}
fi
echo "[lmpipeline] training step finished with exit status $rc"
exit "$rc"
'''
    return header + "\n" + body


def install_source() -> str:
    """What the setup script installs: this checkout when lmpipeline runs from one, else the package."""
    import lmpipeline

    root = Path(lmpipeline.__file__).resolve().parents[1]
    return str(root) if (root / "pyproject.toml").is_file() else "lmpipeline"


def setup_script(spec: SlurmSpec, *, install: str | None = None, extras: str = "gpu", python: str = "python3") -> str:
    out = script_dir(spec, setup=True)
    venv = Path(spec.venv).resolve() if spec.venv else Path(spec.workdir) / "venv"
    source = install or install_source()
    target = f"{source}[{extras}]" if extras else source
    header = "\n".join([
        "#!/bin/bash",
        f"# Written by `lmpipeline slurm --setup` on {_dt.date.today().isoformat()}: create the venv {venv}",
        "# and install lmpipeline into it. Submit once with: sbatch <this file>",
        *_sbatch_common(spec, spec.job_name or "lmpipeline-setup", out / "logs"),
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
    ])
    modules = "\n".join(f"module load {_q(m)}" for m in spec.modules)
    return header + f'''

cd {_q(spec.workdir)}
{modules}
set -euo pipefail
PYTHON=${{PYTHON:-{python}}}
"$PYTHON" -m venv {_q(venv)}
source {_q(Path(venv) / 'bin' / 'activate')}
python -m pip install --upgrade pip
python -m pip install {_q(target)}
python -c "import lmpipeline, torch, accelerate; print('lmpipeline ready: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python -m lmpipeline --help > /dev/null
echo "[lmpipeline] venv ready: use --venv {venv} with lmpipeline slurm"
'''


def write_script(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "logs").mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(path: Path) -> str:
    """sbatch the script; returns the job id."""
    try:
        r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("sbatch was not found on PATH", key="--submit",
                        hint=f"run this on a SLURM login node, or submit {path} there yourself") from None
    if r.returncode != 0:
        raise UserError(f"sbatch failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}", key="--submit")
    return r.stdout.strip().split(";")[0]
