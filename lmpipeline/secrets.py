"""Secrets from the environment: which variables hold them, and how they are kept out of files and logs.

Everything lmpipeline writes that could carry a value from the environment (run.json, run.log, a
package's metadata and model card) goes through `redact`.
"""

from __future__ import annotations

import os

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


def redact(obj):
    """Replace any secret value from the environment wherever it appears in `obj`."""
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj
