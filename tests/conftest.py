"""Shared fixtures. Tests never download: HF offline mode is forced for the whole session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the project with ../shared beside it; a developer checkout has the same layout. On the GPU
# machine (where ../shared does not travel) LMPIPELINE_SHARED_DIR points at a copy of the parts a test needs.
SHARED_DIR = Path(os.environ.get("LMPIPELINE_SHARED_DIR") or REPO_ROOT.parent / "shared")
SHARED_DATA = SHARED_DIR / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """GPU tests skip themselves where no CUDA device is present (CI, this CPU machine)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing entirely: treat as no GPU
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

# LMPIPELINE_TEST_TINY_MODEL points the tests at another small model folder (e.g. while rebuilding the asset).
TINY_MODEL = Path(os.environ.get("LMPIPELINE_TEST_TINY_MODEL") or REPO_ROOT / "lmpipeline" / "assets" / "tiny-chat")
QUICKSTART_DATA = REPO_ROOT / "examples" / "data" / "quickstart"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The embedded tiny chat model (lmpipeline/assets/tiny-chat)."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def quickstart_data() -> Path:
    return QUICKSTART_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own tokenised-data cache, never the user's ~/.cache."""
    monkeypatch.setenv("LMPIPELINE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lmcache"))
    monkeypatch.setenv("LMPIPELINE_NO_PROGRESS", "1")
