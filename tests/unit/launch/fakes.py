"""Fake SLURM commands (srun, scontrol, sbatch) for running generated sbatch scripts locally.

Each fake appends the command line it got to $FAKE_SLURM_CALLS. srun drops its options and runs
the command once, as node 0 of the job, with `exec` so that signals reach the command directly
(as real srun forwards them to its tasks). `scontrol show hostnames` lists two nodes, so scripts
must take the first; `scontrol requeue` only records the call. sbatch answers like --parsable.
"""

from __future__ import annotations

import os
from pathlib import Path

FAKES = {
    "srun": """#!/bin/bash
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do echo "srun-option $1" >> "$FAKE_SLURM_CALLS"; shift; done
echo "srun $*" >> "$FAKE_SLURM_CALLS"
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1
exec "$@"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_CALLS"
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf 'localhost\\nsecond-node\\n'; fi
""",
    "sbatch": """#!/bin/bash
echo "sbatch $*" >> "$FAKE_SLURM_CALLS"
echo "4242;cluster"
""",
}


def install_fake_slurm(folder: Path) -> tuple[Path, Path]:
    """Write the fakes into folder/bin; returns (bin folder, calls file)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in FAKES.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    calls = folder / "slurm_calls.txt"
    calls.touch()
    return bin_dir, calls


def job_env(bin_dir: Path, calls: Path, *, job_id: int = 4242, restart: int = 0, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_CALLS=str(calls),
               SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost,second-node", SLURM_RESTART_COUNT=str(restart))
    env.update(extra)
    return env
