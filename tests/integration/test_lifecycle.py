"""After training: eval -> merge -> package -> report on a run, the six commands, the pilot.

The run is built from a tiny random Llama (Qwen2.5 tokenizer) with an SFT LoRA adapter and a DPO
LoRA adapter on top (tests/unit/evaluate/tiny.py), laid out as the pipeline writes it. Stage results
are recorded into run.json the way the pipeline records them, so each stage sees the ones before.
"""

import argparse
import json
import shutil

import pytest
import torch

from lmpipeline.config.lifecycle import EvalConfig, MergeConfig, PackageConfig
from lmpipeline.context import RunContext, StageOutput
from lmpipeline.evaluate import generation as gen
from lmpipeline.evaluate.stage import EvalStage
from lmpipeline.export.merge import MergeStage
from lmpipeline.export.package import PackageStage, verify_archive
from lmpipeline.report.html import write_report
from tests.unit.evaluate.tiny import cached_run, cached_tiny_model, merged_reference, one_thread

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, shared_data):
    return cached_tiny_model(tmp_path_factory, shared_data)


@pytest.fixture
def run(tmp_path, tmp_path_factory, tiny_llama):
    copy = tmp_path / "run"
    shutil.copytree(cached_run(tmp_path_factory, tiny_llama), copy)
    return copy


@pytest.fixture(scope="module")
def golden(tmp_path_factory, repo_root):
    src = repo_root / "examples" / "data" / "quickstart" / "golden.jsonl"
    out = tmp_path_factory.mktemp("golden") / "golden.jsonl"
    if src.is_file():
        out.write_text("\n".join(src.read_text().splitlines()[:3]) + "\n")
    else:
        out.write_text("\n".join(json.dumps({"prompt": f"Echo: w{i}", "reference": f"w{i}"}) for i in range(3)) + "\n")
    return out


def _context(run_dir):
    data = json.loads((run_dir / "run.json").read_text())
    done = [StageOutput(n, e["kind"], gen.read_run(run_dir).stage(n).final_dir, bool(e.get("adapter")), e.get("metrics") or {})
            for n, e in data["stages"].items() if e.get("status") == "done"]
    return RunContext(run_dir=run_dir, base_model=data["config"]["model_name_or_path"], completed=done)


def _record(run_dir, result, kind):
    """What pipeline.run_pipeline writes for a finished stage."""
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    data["stages"][result.stage_name] = {"kind": kind, "status": "done", "final_dir": str(result.final_dir) if result.final_dir else None,
                                         "adapter": result.adapter, "metrics": result.metrics, "data": result.data,
                                         "notes": result.notes}
    data["config"]["stages"].append(result.stage_name)
    path.write_text(json.dumps(data, default=str))


def test_eval_merge_package_report_chain(run, golden, tiny_llama):
    ev = EvalStage(EvalConfig(stage_name="eval", golden_set=str(golden), max_new_tokens=3)).execute(_context(run))
    _record(run, ev, "eval")
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "sft", "dpo"]

    merged = MergeStage(MergeConfig(stage_name="merge", dtype="float32")).execute(_context(run))
    _record(run, merged, "merge")
    assert merged.final_dir == run / "merge" / "final"
    # The run's latest model is now the merged one, and it computes what base + sft + dpo computes.
    spec = gen.resolve_model(run)
    assert spec.label == "merge" and spec.adapters == []
    model, _ = gen.load_for_inference(run, dtype="float32")
    reference = merged_reference(tiny_llama, [run / "sft" / "final", run / "dpo" / "final"])
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)

    packaged = PackageStage(PackageConfig(stage_name="package", compress_level=1)).execute(_context(run))
    _record(run, packaged, "package")
    archive = packaged.notes["archive"]
    report = verify_archive(archive)
    assert report.ok, report.summary()
    assert report.metadata["content"] == "merged"
    assert [m["name"] for m in report.metadata["evaluation"]] == ["base", "sft", "dpo"]
    assert [s["name"] for s in report.metadata["stages"]] == ["sft", "dpo", "eval", "merge"]

    html = write_report(run).read_text()
    assert html.count("<svg") >= 8 and "Sample generations" in html
    first_output = json.loads((run / "eval" / "samples.jsonl").read_text().splitlines()[0])["outputs"]["dpo"]
    import html as _html

    assert _html.escape(first_output) in html


def _parser():
    from lmpipeline.commands import chat_cmd, eval_cmd, generate, merge_cmd, package_cmd, report_cmd

    parser = argparse.ArgumentParser(prog="lmpipeline")
    sub = parser.add_subparsers(dest="command")
    for mod in (eval_cmd, generate, chat_cmd, merge_cmd, package_cmd, report_cmd):
        mod.add_parser(sub)
    return parser


def _cli(*argv):
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


def test_commands(run, golden, tmp_path, capsys, caplog):
    from lmpipeline.errors import UserError

    with caplog.at_level("INFO"):
        assert _cli("eval", run, "--golden", golden, "--max-new-tokens", 2, "--no-base") == 0
    out = capsys.readouterr().out
    assert "sft" in out and "dpo" in out and (run / "evaluation" / "results.json").is_file()
    tables = [r for r in caplog.records if "results:" in r.getMessage()]
    assert len(tables) == 1 and not any(line.startswith("model ") for line in out.splitlines())  # shown once

    answers = tmp_path / "answers.jsonl"
    assert _cli("generate", run, "--prompts", golden, "--output", answers, "--max-new-tokens", 3) == 0
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 3 and all("output" in r and "reference" in r and r["num_tokens"] <= 3 for r in rows)

    merged = tmp_path / "merged"
    assert _cli("merge", run, "--output", merged, "--dtype", "float32") == 0
    assert (merged / "model.safetensors").is_file()
    with pytest.raises(UserError, match="not empty"):
        _cli("merge", run, "--output", merged)

    pkgs = tmp_path / "pkgs"
    assert _cli("package", run / "sft", "--output-dir", pkgs, "--license", "mit", "--compress-level", "1") == 0
    (archive,) = pkgs.glob("*.tar.gz")
    assert _cli("package", "--verify", archive) == 0
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(bytes(raw))
    assert _cli("package", "--verify", broken) == 1
    with pytest.raises(UserError, match="--output-dir"):
        _cli("package", run)
    with pytest.raises(UserError, match="hub_repo_id"):
        _cli("package", run, "--output-dir", pkgs, "--push-to-hub")

    assert _cli("report", run) == 0 and (run / "report.html").is_file()


def _stage_kinds_registered() -> bool:
    from lmpipeline.config.schema import STAGE_ALIASES

    return all(k in STAGE_ALIASES for k in ("eval", "merge", "package"))


@pytest.mark.skipif(not _stage_kinds_registered(), reason="eval/merge/package stages are not wired into the pipeline yet")
def test_pipeline_runs_sft_eval_merge_package(tmp_path, tiny_llama, golden, repo_root, capsys):
    import yaml

    from lmpipeline.cli import main

    data = repo_root / "examples" / "data" / "quickstart" / "sft_train.jsonl"
    cfg = {"model_name_or_path": str(tiny_llama), "output_dir": str(tmp_path / "run"),
           "stages": ["sft", "eval", "merge", "package"],
           "stage_configs": {"sft": {"dataset_name_or_path": str(data), "max_samples": 16, "max_seq_length": 64,
                                     "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                                     "save_strategy": "no"},
                             "eval": {"golden_set": str(golden), "max_new_tokens": 2},
                             "merge": {"dtype": "float32"},
                             "package": {"compress_level": 1}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [record["stages"][s]["status"] for s in ("sft", "eval", "merge", "package")] == ["done"] * 4
    (archive,) = (tmp_path / "run" / "package").glob("*.tar.gz")
    assert verify_archive(archive).ok
    summary = capsys.readouterr().out
    assert "None" not in summary  # the eval's numbers and the archive, not `eval: None` / `package: None`
    assert "  eval: " in summary and "exact_match=" in summary and "results.json" in summary
    assert f"  package: {archive}" in summary


def test_pilot_trains_briefly_then_evaluates(tmp_path, tiny_llama, repo_root):
    pytest.importorskip("lmpipeline.data.packing")
    import yaml

    from lmpipeline.evaluate.pilot import run_pilot

    data = repo_root / "examples" / "data" / "quickstart" / "sft_train.jsonl"
    if not data.is_file():
        pytest.skip("quickstart data not present")
    cfg = {"model_name_or_path": str(tiny_llama), "output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "stage_configs": {"sft": {"dataset_name_or_path": str(data), "max_samples": 16, "max_seq_length": 64,
                                     "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_steps": 500}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    printed = []
    summary = run_pilot(str(path), [], steps=3, max_new_tokens=4, print_fn=printed.append)
    pilot_dir = tmp_path / "run-pilot"
    assert summary["output_dir"] == str(pilot_dir) and not (tmp_path / "run").exists()
    record = json.loads((pilot_dir / "run.json").read_text())
    assert record["stages"]["sft"]["global_step"] == 3
    assert record["derived"]["stage_configs.sft.max_steps"] == 3 and record["derived"]["pilot"] is True
    assert record["stages"]["pilot_eval"]["kind"] == "eval"
    assert [m["name"] for m in summary["eval"]] == ["base", "sft"]
    assert isinstance(summary["loss_fell"], bool) and summary["logged_points"] == 3
    assert any(line.startswith("loss ") for line in printed) and any("sample 1" in line for line in printed)
    assert (pilot_dir / "pilot.json").is_file() and (pilot_dir / "pilot_eval" / "samples.jsonl").is_file()


def test_pilot_evaluates_the_whole_golden_set_and_reports_it(tmp_path, tiny_model, quickstart_data):
    import yaml

    from lmpipeline.evaluate.pilot import run_pilot

    golden = quickstart_data / "golden.jsonl"
    n_golden = len(golden.read_text().splitlines())
    cfg = {"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "run"), "stages": ["sft", "eval"],
           "stage_configs": {"sft": {"dataset_name_or_path": str(quickstart_data / "sft_train.jsonl"),
                                     "max_seq_length": 128, "per_device_train_batch_size": 8},
                             "eval": {"golden_set": str(golden), "max_new_tokens": 4}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_pilot(str(path), [], steps=2, print_fn=lambda line: None)
    pilot_dir = tmp_path / "run-pilot"
    assert len((pilot_dir / "pilot_eval" / "samples.jsonl").read_text().splitlines()) == n_golden > 8
    record = json.loads((pilot_dir / "run.json").read_text())
    assert record["derived"]["stage_configs.sft.dataset_format"] == "instruction_response"  # as the eval renders it
    report = (pilot_dir / "report.html").read_text()
    assert "pilot_eval" in report and summary["eval"][0]["name"] in report  # drawn after the evaluation
