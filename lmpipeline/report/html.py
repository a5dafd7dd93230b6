"""report.html: one self-contained page about a run (no scripts, no CDN, no external file).

Contents, each section present only when the run has the data:
    stages       status, steps, model folder, data fingerprint and final metrics of every stage
    curves       per training stage, from <stage>/metrics.jsonl: loss (train line, eval points),
                 learning rate, gradient norm, throughput (tokens/s), peak memory; for DPO the
                 rewards (chosen, rejected, margins), reward accuracy and log-probs
    evaluation   the model table of each eval stage's results.json
    samples      the eval stage's samples.jsonl: each prompt with the reference and every model's
                 output side by side (base vs tuned)
    config       the resolved config and package versions from run.json

Plots are inline SVG drawn here: a line chart is ~80 lines, while a plotting library (matplotlib is
not a dependency of lmpipeline) would add tens of MB for the same polylines. Every text from the run
(prompts, outputs, config values) is HTML-escaped. Reading is lenient: a malformed metrics line is
skipped and counted on the page, never an error, so a report can be made of a crashed run too.
Raises UserError only when the folder has no run.json.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmpipeline import outputs
from lmpipeline.errors import UserError
from lmpipeline.numbers import fmt_number

REPORT_FILE = "report.html"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_SAMPLES = 30


# ------------------------------------------------------------------------------------------ charts


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    markers: bool = False  # eval points: sparse, drawn as dots as well as a line



def _trained(stage: dict) -> bool:
    """A training stage of run.json (older records lack the flag: only training stages count steps)."""
    return bool(stage.get("trained", "global_step" in stage))

def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values from <= lo to >= hi (the data always stays inside the frame)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 25:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def line_chart(series: list[Series], *, title: str, x_label: str = "step", width: int = 560, height: int = 240) -> str:
    """An SVG line chart of `series` (non-finite points are left out); '' when nothing is plottable."""
    series = [Series(s.name, [(x, y) for x, y in s.points if _finite(x) and _finite(y)], s.markers) for s in series]
    series = [s for s in series if s.points]
    if not series:
        return ""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    xt = _nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    yt = _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 62, 12, 40, 38
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    e = html.escape
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{e(title)}">',
           f'<text x="{left}" y="16" class="title">{e(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" class="tick" text-anchor="end">{fmt_number(t)}</text>')
    for t in xt:
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{fmt_number(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" class="tick" text-anchor="middle">{e(x_label)}</text>')
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(s.points)
        d = " ".join(f"{'M' if k == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for k, (x, y) in enumerate(pts))
        out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.6"><title>{e(s.name)}</title></path>')
        if s.markers or len(pts) == 1:
            for x, y in pts:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                           f'<title>{e(s.name)} at {fmt_number(x)}: {fmt_number(y)}</title></circle>')
        lx = left + i * 130  # legend row between the title and the plot, so it never hides a curve
        out.append(f'<rect x="{lx}" y="{top - 12}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{top - 7}" class="legend">{e(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------ reading


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Records of a metrics.jsonl and the number of unreadable lines."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and _finite(rec.get("step")):
            rows.append(rec)
        else:
            bad += 1
    return rows, bad


def _series(rows: list[dict], key: str, name: str | None = None, markers: bool = False) -> Series:
    return Series(name or key, [(r["step"], r[key]) for r in rows if key in r], markers)


CHARTS: list[tuple[str, list[tuple[str, str, bool]]]] = [
    # (title, [(metrics key, legend name, eval markers)])
    ("Loss", [("loss", "train loss", False), ("eval_loss", "eval loss", True)]),
    ("Learning rate", [("learning_rate", "learning rate", False)]),
    ("Gradient norm (before clipping)", [("grad_norm", "grad norm", False)]),
    ("DPO rewards", [("rewards/chosen", "chosen", False), ("rewards/rejected", "rejected", False),
                     ("rewards/margins", "margin", False), ("eval_rewards/margins", "eval margin", True)]),
    ("DPO reward accuracy", [("rewards/accuracies", "train", False), ("eval_rewards/accuracies", "eval", True)]),
    ("DPO log-probs", [("logps/chosen", "chosen", False), ("logps/rejected", "rejected", False)]),
    ("Throughput (tokens/s)", [("tokens_per_second", "tokens/s", False)]),
    ("Peak memory (GiB)", [("peak_memory_gib", "peak memory", False)]),
]


# ------------------------------------------------------------------------------------------ page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;background:#fff}
.chart .title{font-size:13px;font-weight:600}.chart .tick{font-size:10px;fill:#555}.chart .legend{font-size:11px}
.chart .grid{stroke:#eee}.chart .frame{fill:none;stroke:#bbb}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px}.muted{color:#777}
.sample td{max-width:360px}
"""


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v if v is not None else "-"))
    if isinstance(v, float):
        return "-" if math.isnan(v) else fmt_number(v)
    if isinstance(v, int):
        return fmt_number(v)
    return html.escape(str(v))


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = []
    for r in rows:
        cells = "".join(f'<td class="num">{_num(v)}</td>' if i in numeric else f"<td>{v}</td>" for i, v in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _stage_section(run_dir: Path, name: str, entry: dict) -> str:
    rows, bad = read_metrics(run_dir / name / "metrics.jsonl")
    if not rows:
        return ""
    charts = []
    for title, keys in CHARTS:
        svg = line_chart([_series(rows, k, legend, mk) for k, legend, mk in keys], title=title)
        if svg:
            charts.append(svg)
    note = f'<p class="muted">{bad} unreadable metrics line(s) skipped.</p>' if bad else ""
    return (f"<h3>{html.escape(name)} ({html.escape(str(entry.get('kind', '')))})</h3>{note}"
            f'<div class="charts">{"".join(charts)}</div>')


def _eval_section(run_dir: Path, name: str) -> str:
    path = run_dir / name / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    models = results.get("models") or []
    cols = [c for c in results.get("columns", []) if any(c in m for m in models)]
    parts = [f"<h3>{html.escape(name)}</h3>",
             f'<p class="muted">golden set: {html.escape(str(results.get("golden_set")))}, '
             f'{results.get("num_prompts", 0)} prompt(s); loss data: {results.get("num_loss_examples", 0)} example(s); '
             f'chat template from {html.escape(str(results.get("chat_template_from")))}; greedy, '
             f'max_new_tokens={html.escape(str((results.get("generation") or {}).get("max_new_tokens")))}</p>']
    parts.append(_table(["model"] + cols, [[html.escape(str(m.get("name")))] + [m.get(c) for c in cols] for m in models],
                        numeric=set(range(1, len(cols) + 1))))
    bars = []
    for c in ("eval_loss", "rouge_l", "bleu"):
        pts = [(i, m[c]) for i, m in enumerate(models) if _finite(m.get(c))]
        if len(pts) >= 1:
            bars.append(_bar_chart(c, [(str(models[i]["name"]), v) for i, v in pts]))
    if bars:
        parts.append(f'<div class="charts">{"".join(bars)}</div>')
    parts.append(_samples_table(run_dir / name / "samples.jsonl"))
    return "".join(parts)


def _bar_chart(title: str, bars: list[tuple[str, float]], width: int = 300, height: int = 200) -> str:
    e = html.escape
    top, bottom, left = 40, 40, 40
    ph = height - top - bottom
    hi = max([v for _, v in bars] + [0.0]) or 1.0
    bw = (width - left - 10) / max(len(bars), 1)
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{e(title)}"><text x="{left}" y="16" class="title">{e(title)}</text>']
    for i, (label, v) in enumerate(bars):
        h = max(v, 0) / hi * ph
        x = left + i * bw + bw * 0.15
        out.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{bw * 0.7:.1f}" height="{h:.1f}" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"><title>{e(label)}: {fmt_number(v)}</title></rect>'
                   f'<text x="{x + bw * 0.35:.1f}" y="{top + ph + 14}" class="tick" '
                   f'text-anchor="middle">{e(label[:14])}</text>'
                   f'<text x="{x + bw * 0.35:.1f}" y="{top + ph - h - 3:.1f}" class="tick" '
                   f'text-anchor="middle">{fmt_number(v)}</text>')
    out.append(f'<line x1="{left}" x2="{width - 10}" y1="{top + ph}" y2="{top + ph}" class="frame" stroke="#bbb"/></svg>')
    return "".join(out)


def _samples_table(path: Path) -> str:
    if not path.is_file():
        return ""
    samples = []
    for line in path.read_text(errors="replace").splitlines()[:MAX_SAMPLES]:
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not samples:
        return ""
    models = list(samples[0].get("outputs", {}))
    head = ["#", "prompt", "reference"] + models
    rows = []
    for s in samples:
        cells = [str(s.get("index", "")), f"<pre>{html.escape(str(s.get('prompt_text', '')))}</pre>",
                 f"<pre>{html.escape(str(s.get('reference') if s.get('reference') is not None else '-'))}</pre>"]
        cells += [f"<pre>{html.escape(str(s.get('outputs', {}).get(m, '')))}</pre>" for m in models]
        rows.append(cells)
    return (f"<h3>Sample generations ({len(samples)} shown)</h3>"
            f'<div class="sample">{_table(head, rows)}</div>')


def render_report(run_dir: str | Path) -> str:
    """The HTML text of the report of `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} holds no run.json: not a run folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {run_dir / 'run.json'}: {e}") from None
    e = html.escape
    config = run.get("config") or {}
    stages: dict = run.get("stages") or {}
    title = f"lmpipeline report: {run_dir.resolve().name}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f'<p>base model <code>{e(str(config.get("model_name_or_path")))}</code>; created {e(str(run.get("created")))}'
             f'{"; finished " + e(str(run.get("finished"))) if run.get("finished") else " (not finished)"}</p>']

    rows = []
    for name, st in stages.items():
        m = st.get("metrics") or {}
        shown = ", ".join(f"{k}={_num(v)}" for k, v in m.items() if _finite(v))
        fp = (st.get("data") or {}).get("fingerprint") or "-"
        steps = st.get("global_step", "-") if _trained(st) else "-"
        rows.append([e(name), e(str(st.get("kind", ""))), e(str(st.get("status", ""))), steps,
                     e("adapter" if st.get("adapter") else "full" if st.get("final_dir") not in (None, "None") else "-"),
                     f"<code>{e(str(fp)[:16])}</code>", e(shown)])
    parts += ["<h2>Stages</h2>", _table(["stage", "kind", "status", "steps", "model", "data fingerprint", "final metrics"],
                                        rows, numeric={3})]
    # A stage that did not finish says why, in the words run.json recorded (pipeline._run_one).
    stopped = [(name, st) for name, st in stages.items() if st.get("status") in ("failed", "interrupted", "preempted")]
    parts += [f'<p class="stopped"><b>{e(name)} {e(str(st["status"]))}</b>: {e(str(st.get("error") or "no message recorded"))}</p>'
              for name, st in stopped]

    curves = [_stage_section(run_dir, name, st) for name, st in stages.items() if _trained(st)]
    curves = [c for c in curves if c]
    if curves:
        parts += ["<h2>Training curves</h2>"] + curves
    evals = [_eval_section(run_dir, name) for name, st in stages.items() if st.get("kind") == "eval"]
    evals = [x for x in evals if x]
    if evals:
        parts += ["<h2>Evaluation</h2>"] + evals
    config_text = e(json.dumps(config, indent=2, default=str))
    derived_text = e(json.dumps(run.get("derived") or {}, indent=2, default=str))
    parts += ["<h2>Config and versions</h2>",
              f"<details><summary>resolved config</summary><pre>{config_text}</pre></details>",
              f"<details><summary>derived values</summary><pre>{derived_text}</pre></details>",
              _table(["package", "version"], [[e(k), e(str(v))] for k, v in (run.get("versions") or {}).items()]),
              "</body></html>"]
    return "\n".join(parts)


def _is_report(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"<!DOCTYPE html>") and b"<title>lmpipeline report" in head


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report (default <run_dir>/report.html) and return its path."""
    out = Path(output) if output else Path(run_dir) / REPORT_FILE
    outputs.check_is_file_target(out, key="--output")
    if out.is_file() and not _is_report(out):
        raise UserError(f"{out} exists and is not a report lmpipeline wrote, so it will not be replaced", key="--output",
                        hint="choose a new file name for the report")
    text = render_report(run_dir)
    tmp = outputs.unique_temp(out)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["render_report", "write_report", "line_chart", "Series", "REPORT_FILE"]
