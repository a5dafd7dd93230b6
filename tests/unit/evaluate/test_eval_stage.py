"""The eval stage: base and every trained stage side by side, results.json and samples.jsonl."""

import json

import pytest
from pydantic import ValidationError

from lmpipeline.config.lifecycle import EvalConfig
from lmpipeline.context import RunContext, StageOutput
from lmpipeline.errors import UserError
from lmpipeline.evaluate.stage import EvalStage, format_table
from tests.unit.evaluate.tiny import one_thread, write_golden


def _ctx(run_dir, tiny_llama):
    return RunContext(run_dir=run_dir, base_model=str(tiny_llama), completed=[
        StageOutput("sft", "sft", run_dir / "sft" / "final", True),
        StageOutput("dpo", "dpo", run_dir / "dpo" / "final", True)])


@pytest.fixture(scope="module")
def eval_out(run_dir, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    golden = write_golden(tmp / "golden.jsonl")
    cfg = EvalConfig(stage_name="eval", output_dir=str(tmp / "eval"), golden_set=str(golden), max_new_tokens=3,
                     generation_batch_size=2)
    with one_thread():
        result = EvalStage(cfg).execute(_ctx(run_dir, tiny_llama))
    return result, tmp / "eval"


def test_results_table_has_base_and_each_stage(eval_out):
    result, out = eval_out
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == ["base", "sft", "dpo"]
    for m in results["models"]:
        for key in ("eval_loss", "eval_perplexity", "exact_match", "rouge_l", "bleu", "gen_tokens_mean",
                    "generated_tokens_per_second"):
            assert key in m, key
        assert m["num_prompts"] == 4 and m["num_with_reference"] == 3
    assert results["models"][2]["adapters"][-1].endswith("dpo/final")
    assert results["chat_template_from"] == "dpo"
    assert result.final_dir is None and "base_eval_loss" in result.metrics and "eval_loss" in result.metrics
    assert "base" in format_table(results["models"])


def test_samples_hold_every_models_output_per_prompt(eval_out):
    _, out = eval_out
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert set(lines[0]["outputs"]) == {"base", "sft", "dpo"}
    assert lines[0]["reference"] == "4" and lines[3]["reference"] is None
    # Different weights, same prompts: the tuned outputs are not all the base's.
    assert any(x["outputs"]["base"] != x["outputs"]["dpo"] for x in lines)


def test_models_filter_and_errors(run_dir, tiny_llama, tmp_path):
    golden = write_golden(tmp_path / "g.jsonl", n=1)
    cfg = EvalConfig(stage_name="eval", output_dir=str(tmp_path / "e"), golden_set=str(golden), max_new_tokens=2,
                     models=["sft"], compare_base=False)
    EvalStage(cfg).execute(_ctx(run_dir, tiny_llama))
    names = [m["name"] for m in json.loads((tmp_path / "e" / "results.json").read_text())["models"]]
    assert names == ["sft"]
    with pytest.raises(UserError, match="no finished sft/dpo stage named nope"):
        EvalStage(cfg.model_copy(update={"models": ["nope"]})).execute(_ctx(run_dir, tiny_llama))
    with pytest.raises(UserError, match="nothing to evaluate"):
        EvalStage(EvalConfig(output_dir=str(tmp_path / "x"))).execute(_ctx(run_dir, tiny_llama))


def test_loss_on_eval_dataset(run_dir, tiny_llama, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]}) for i in range(3)))
    cfg = EvalConfig(output_dir=str(tmp_path / "e"), eval_dataset=str(data), compare_base=True, models=[])
    EvalStage(cfg).execute(_ctx(run_dir, tiny_llama))
    (row,) = json.loads((tmp_path / "e" / "results.json").read_text())["models"]
    assert row["name"] == "base" and row["eval_tokens"] > 0 and "rouge_l" not in row
    assert not (tmp_path / "e" / "samples.jsonl").exists()


def test_config_is_strict():
    with pytest.raises(ValidationError):
        EvalConfig(golden="x.jsonl")
    assert all(f.description for f in EvalConfig.model_fields.values())
