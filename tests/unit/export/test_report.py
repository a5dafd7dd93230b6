"""report.html: one self-contained page with SVG curves, the eval table and base-vs-tuned samples."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmpipeline.errors import UserError
from lmpipeline.report.html import Series, line_chart, render_report, write_report

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.external: list[str] = []
        self.svg_titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.external.append(v)
            if tag == "svg" and k == "aria-label":
                self.svg_titles.append(v)


@pytest.fixture(scope="module")
def report_run(run_dir, tmp_path_factory):
    """The shared run plus an eval stage's results and samples, as the eval stage writes them."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(run_dir, run)
    (run / "eval").mkdir()
    models = [{"name": "base", "kind": "base", "eval_loss": 3.1, "rouge_l": 0.1, "bleu": 2.0},
              {"name": "sft", "kind": "sft", "eval_loss": 2.2, "rouge_l": 0.3, "bleu": 8.0},
              {"name": "dpo", "kind": "dpo", "eval_loss": 2.3, "rouge_l": 0.35, "bleu": 9.0}]
    (run / "eval" / "results.json").write_text(json.dumps({
        "golden_set": "g.jsonl", "num_prompts": 2, "columns": ["eval_loss", "rouge_l", "bleu"], "models": models}))
    samples = [{"index": i, "prompt_text": f"<b>prompt {i}</b>", "reference": "ref",
                "outputs": {"base": f"base says {i}", "sft": f"sft says {i}", "dpo": f"dpo says {i}"}} for i in range(2)]
    (run / "eval" / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples))
    data = json.loads((run / "run.json").read_text())
    data["stages"]["eval"] = {"kind": "eval", "status": "done", "metrics": {"rouge_l": 0.35}}
    (run / "run.json").write_text(json.dumps(data))
    with open(run / "sft" / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    return run


def test_report_has_plots_tables_and_samples(report_run):
    text = render_report(report_run)
    p = _Collect()
    p.feed(text)
    assert p.tags.get("svg", 0) >= 10 and p.tags.get("path", 0) >= 10
    assert {"Loss", "Learning rate", "Gradient norm (before clipping)", "DPO rewards", "DPO reward accuracy",
            "Throughput (tokens/s)", "Peak memory (GiB)"} <= set(p.svg_titles)
    assert p.external == [] and p.tags.get("script", 0) == 0  # self-contained: nothing fetched
    assert "sft says 1" in text and "dpo says 0" in text and "base says 1" in text
    assert "&lt;b&gt;prompt 0&lt;/b&gt;" in text  # run text is escaped
    assert "1 unreadable metrics line(s) skipped" in text


def test_write_report_default_path_and_errors(report_run, tmp_path):
    path = write_report(report_run)
    assert path == report_run / "report.html" and path.stat().st_size > 1000
    with pytest.raises(UserError, match="no run.json"):
        write_report(tmp_path)


def test_line_chart_skips_non_finite_points_and_empty_series():
    svg = line_chart([Series("a", [(1, 1.0), (2, float("nan")), (3, 2.0)]), Series("b", [])], title="t")
    assert svg.count("<path") == 1 and "nan" not in svg
    assert line_chart([Series("a", [(1, float("inf"))])], title="t") == ""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_report_renders_in_headless_chromium(report_run):
    path = write_report(report_run)
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    p = _Collect()
    p.feed(r.stdout)
    assert p.tags.get("svg", 0) >= 10 and p.tags.get("path", 0) >= 10 and "dpo says 0" in r.stdout
