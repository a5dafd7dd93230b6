"""The README speaks the project's own language, and documents what a user meets."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_no_internal_references():
    # The user's source documents and the team's guide are not the reader's: name the use case instead.
    assert not re.search(r"\bseed ?\d{3}\b|seed example|GUIDE", README, flags=re.IGNORECASE)


def test_every_example_is_listed():
    missing = [p.name for p in (REPO_ROOT / "examples").glob("*.yaml") if f"examples/{p.name}" not in README]
    assert not missing


def test_what_a_user_meets_is_documented():
    for needle in ("LMPIPELINE_CACHE_DIR", "--stages", "--version", "model card", "<output_dir>/slurm/"):
        assert needle in README, needle
