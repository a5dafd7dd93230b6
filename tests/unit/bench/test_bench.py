"""lmpipeline bench: the workloads are the peer measurement's, settings are valid configs, the figures
are computed as documented, and a tiny run of both engines goes end to end on the CPU."""

import json

import numpy as np
import pytest

from lmpipeline.bench import measure, settings, workloads
from lmpipeline.commands.bench_cmd import _curve_agreement, format_table


def test_sft_lengths_are_the_anchor_distribution():
    # ../shared/bench/sft_anchor_bench.py: lognormal(log 200, 0.7, 3000) as int, clipped 16..2048, seed 0
    rng = np.random.default_rng(0)
    anchor = np.clip(rng.lognormal(np.log(200), 0.7, 3000).astype(int), 16, 2048)
    rows = workloads.sft_rows("llama-3.2-3b")
    assert [len(r) for r in rows] == anchor.tolist()
    sp = workloads.specials("llama-3.2-3b")
    assert all(r[0] == sp.bos and r[-1] == sp.eos for r in rows[:50])
    assert max(max(r[1:-1]) for r in rows) < workloads.word_limit(sp)
    long = workloads.sft_rows("llama-3.2-3b", "long")
    assert 1500 < float(np.median([len(r) for r in long])) < 2600 and max(map(len, long)) <= 8192


def test_preference_pairs_and_the_text_trl_sees(tmp_path):
    pairs = workloads.preference_rows("tiny", 40)
    sp = workloads.specials("tiny")
    assert all(8 <= len(p) <= 512 and c[-1] == sp.eos and r[-1] == sp.eos for p, c, r in pairs)
    tok = workloads.make_tokenizer("tiny", tmp_path)
    prompt = pairs[0][0]
    assert tok(workloads.as_text(prompt), add_special_tokens=False)["input_ids"] == prompt


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_every_setting_is_a_valid_config(kind):
    from lmpipeline.config.schema import DPOConfig, SFTConfig

    for name, (desc, extra) in settings.KINDS[kind]["ours"].items():
        common = settings.SFT_COMMON if kind == "sft" else settings.DPO_COMMON
        cls = SFTConfig if kind == "sft" else DPOConfig
        cls(stage_name=kind, output_dir="/tmp/x", **({"max_seq_length": 2048} if kind == "sft" else {}),
            **{**common, **extra})
        assert desc
    for name, (desc, s) in settings.KINDS[kind]["trl"].items():
        assert s["batch"] * s["ga"] == 8  # the peers' global batch


def test_figures_are_computed_as_documented():
    res = measure.summarize([9.0, 1.0, 2.0, 2.0], [100, 1000, 2000, 3000], warmup=1)
    assert res == {"tokens_per_s": 6000 / 5.0, "s_per_step": 5.0 / 3, "timed_steps": 3}
    # GUIDE section 5: 61,000 tokens/s is about 100% of 790 TFLOP/s for LoRA (k=4) on Llama-3.2-3B
    assert measure.mfu(61_500, "llama-3.2-3b", 4) == pytest.approx(1.0, rel=0.01)
    assert _curve_agreement([2.0] * 10, [2.02] * 10) == pytest.approx(0.02 / 2.02)
    table = format_table([
        {"engine": "trl", "kind": "sft", "setting": "best", "tokens_per_s": 100.0, "peak_alloc_gib": 2.0, "mfu": 0.1,
         "losses": [3.0, 2.0]},
        {"engine": "ours", "kind": "sft", "setting": "packed", "tokens_per_s": 250.0, "peak_alloc_gib": 1.0, "mfu": 0.25,
         "losses": [3.0, 2.0]},
        {"engine": "ours", "kind": "sft", "setting": "big", "error": "out of memory: ..."},
    ])
    assert "| ours | packed | 250 | 1.00 | 25.0% | 2.50x |" in table and "out of memory" in table


@pytest.mark.integration
def test_tiny_bench_runs_both_engines(tmp_path):
    """Both engines, 2 steps each on the tiny architecture (CPU: fp32, torch AdamW, no Liger), on the short
    rows (at 2,048 tokens a packed row's attention backward alone takes ~10 s per micro-batch on 2 cores)."""
    model_dir = workloads.make_model("tiny", tmp_path / "model")
    ours = measure.run("ours", "sft", "packed", "tiny", model_dir, lengths="short", steps=2, warmup=1,
                       work=tmp_path / "w")
    assert ours["tokens_per_s"] > 0 and len(ours["losses"]) == 2 and ours["engine"] == "ours"
    pytest.importorskip("trl")
    theirs = measure.run("trl", "sft", "best", "tiny", model_dir, lengths="short", steps=2, warmup=1,
                         work=tmp_path / "w")
    assert theirs["tokens_per_s"] > 0 and len(theirs["losses"]) == 2
    # same data, same model: the first losses agree closely (both ~ln(vocab) on random weights)
    assert abs(ours["losses"][0] - theirs["losses"][0]) < 0.05
    json.dumps([ours, theirs])  # results are JSON-serialisable


def test_unknown_model_is_a_clear_error(capsys):
    from lmpipeline.cli import main

    assert main(["bench", "sft", "--model", "gpt-9", "--ours", "packed"]) == 2
    assert "unknown bench model `gpt-9`" in capsys.readouterr().err


@pytest.mark.integration
def test_tiny_generation_bench_command_writes_every_path(tmp_path, capsys):
    """`lmpipeline bench generate` end to end on the CPU: the tiny architecture, tiny sizes, all three paths
(one batch size: each path is a fresh worker process, ~10 s of imports on a busy 2-core machine)."""
    from lmpipeline.cli import main

    results = tmp_path / "results"
    assert main(["bench", "generate", "--model", "tiny", "--batch-sizes", "2", "--prompt-tokens", "6",
                 "--new-tokens", "3", "--model-dir", str(tmp_path / "model"), "--work", str(tmp_path / "w"),
                 "--results", str(results)]) == 0
    (path,) = results.glob("*-generate-tiny.json")
    rows = json.loads(path.read_text())
    assert [(r["engine"], r["batch"]) for r in rows] == [(e, b) for b in (2,) for e in ("ours", "hf-dynamic", "hf-static")]
    for r in rows:
        assert "error" not in r, r
        assert r["generated_tokens"] == r["batch"] * 3 and r["new_tokens_per_s"] > 0
        assert r["time_to_first_token_s"] > 0 and r["setup_seconds"] > 0
    assert "| ours | 2 |" in capsys.readouterr().out


def test_generation_bench_rejects_unknown_paths_and_sizes(capsys):
    from lmpipeline.cli import main

    assert main(["bench", "generate", "--model", "tiny", "--engines", "vllm"]) == 2
    assert "unknown generation path(s): vllm" in capsys.readouterr().err
    assert main(["bench", "generate", "--model", "tiny", "--batch-sizes", "0,x"]) == 2
    assert "positive integers" in capsys.readouterr().err
