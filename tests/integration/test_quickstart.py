"""The quickstart, as `make demo` runs it: SFT -> DPO -> eval -> merge -> package, offline on the CPU."""

import json
import time

import pytest

from lmpipeline.cli import main

pytestmark = pytest.mark.integration


def test_quickstart_learns_and_packages(tmp_path, repo_root, tiny_model, monkeypatch):
    monkeypatch.chdir(repo_root)  # the config's paths are relative to the repo, as in `make demo`
    out = tmp_path / "quickstart"
    t0 = time.perf_counter()
    code = main(["run", "examples/quickstart.yaml", "--set", f"output_dir={out}",
                 "--set", f"model_name_or_path={tiny_model}"])
    seconds = time.perf_counter() - t0
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in record["stages"].values()] == ["done"] * 5

    results = json.loads((out / "eval" / "results.json").read_text())
    rows = {r["name"]: r for r in results["models"]}
    base, sft, dpo = rows["base"], rows["sft"], rows["dpo"]
    # Learning, honestly measured on held-out examples the stages never trained on.
    assert sft["eval_loss"] < 0.5 * base["eval_loss"]
    assert sft["rouge_l"] > base["rouge_l"]
    assert record["stages"]["dpo"]["metrics"]["eval_rewards/accuracies"] > 0.5

    from lmpipeline.export.package import verify_archive

    archives = list((out / "package").rglob("*.tar.gz"))
    assert archives and verify_archive(archives[0]).ok
    assert (out / "report.html").exists()
    assert seconds < 300, f"the quickstart took {seconds:.0f} s"
