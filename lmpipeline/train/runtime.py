"""Process-level set-up for a training stage: the accelerate handle, trackers, seeds, threads."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from lmpipeline.config.schema import TrainStageConfig
from lmpipeline.errors import UserError

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_accelerator(cfg: TrainStageConfig, output_dir: Path):
    """An Accelerator for device placement, DDP and trackers.

    Mixed precision is applied by the loop's own autocast rather than accelerate's, because
    accelerate's state is process-global and a pipeline runs stages with different precisions.
    """
    from accelerate import Accelerator

    trackers = cfg.trackers
    if "wandb" in trackers:
        # Offline unless the user explicitly chose otherwise: nothing leaves the machine by default.
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (output_dir / "mlruns").resolve().as_uri())
    try:
        accelerator = Accelerator(log_with=trackers or None, project_dir=str(output_dir))
    except (ImportError, ValueError) as e:
        raise UserError(f"tracker set-up failed: {e}", key="report_to",
                        hint="install the tracker's package (tensorboard, wandb, mlflow) or use report_to: none") from None
    if trackers:
        run_config = {k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.run_name or cfg.stage_name or "lmpipeline", config=run_config)
    return accelerator
