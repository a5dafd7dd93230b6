"""The pilot's config rewrite and loss verdict (the run itself: tests/integration/test_lifecycle.py)."""

import json

import pytest

from lmpipeline.config.loader import load_config
from lmpipeline.config.schema import STAGE_ALIASES
from lmpipeline.evaluate.pilot import loss_trend, pilot_config


def _cfg(tmp_path, stages, configs):
    return load_config(data={"model_name_or_path": "org/model", "output_dir": str(tmp_path / "run"),
                             "stages": stages, "stage_configs": configs})


def test_first_training_stage_only_limited_and_never_over_the_real_run(tmp_path):
    cfg = _cfg(tmp_path, ["sft", "dpo"], {"sft": {"dataset_name_or_path": "a.jsonl", "logging_steps": 50},
                                          "dpo": {"dataset_name_or_path": "p.jsonl"}})
    pilot, first, kind, eval_cfg, derived = pilot_config(cfg, steps=20)
    assert pilot.stages == ["sft"] and first == "sft" and kind == "sft"
    sft = pilot.stage("sft")
    assert sft.max_steps == 20 and sft.logging_steps == 2 and sft.save_strategy == "no"
    assert sft.dataset_name_or_path == "a.jsonl"  # no golden set: the stage's own data
    assert pilot.output_dir == str(tmp_path / "run") + "-pilot"
    assert pilot._derived["pilot"] is True and derived["stage_configs.sft.max_steps"] == 20
    assert eval_cfg.golden_set is None


@pytest.mark.skipif("eval" not in STAGE_ALIASES, reason="the eval stage is not registered in the schema yet")
def test_golden_set_of_the_eval_stage_becomes_the_training_data(tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n")
    cfg = _cfg(tmp_path, ["sft", "eval"], {"sft": {"dataset_name_or_path": "a.jsonl", "validation_split_ratio": 0.1},
                                           "eval": {"golden_set": str(golden)}})
    pilot, _, _, eval_cfg, derived = pilot_config(cfg, steps=10)  # an eval through the chat template
    sft = pilot.stage("sft")
    assert sft.dataset_name_or_path == str(golden) and sft.dataset_format == "instruction_response"
    assert sft.column_mapping == {"instruction": "prompt", "response": "reference"} and sft.validation_split_ratio == 0.0
    assert eval_cfg.golden_set == str(golden) and pilot.stages == ["sft"]
    assert derived["stage_configs.sft.dataset_format"] == "instruction_response"
    raw = pilot_config(cfg, steps=10, chat_template=False)[0].stage("sft")  # an eval on raw prompt text
    assert raw.dataset_format == "prompt_completion" and raw.column_mapping == {"completion": "reference"}


def test_golden_rows_train_on_the_tokens_the_eval_generates_from(tmp_path, tiny_model, quickstart_data):
    """The pilot's training example of a golden row starts with exactly the eval's prompt ids, and trains
    only the reference after them (and the turn's end)."""
    from lmpipeline.data.build import build_sft_data
    from lmpipeline.data.masking import IGNORE_INDEX
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.evaluate.pilot import eval_renders_chat, pilot_eval_config
    from lmpipeline.models.loading import load_tokenizer

    golden = quickstart_data / "golden.jsonl"
    cfg = load_config(data={"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "run"),
                            "stages": ["sft", "eval"], "stage_configs": {
                                "sft": {"dataset_name_or_path": "unused.jsonl", "max_seq_length": 128},
                                "eval": {"golden_set": str(golden)}}})
    assert eval_renders_chat(cfg, pilot_eval_config(cfg))
    pilot = pilot_config(cfg, steps=2, chat_template=True)[0]
    tokenizer = load_tokenizer(str(tiny_model))
    examples = build_sft_data(pilot.stage("sft"), tokenizer).train
    prompts = gen.read_prompts(golden)
    template = gen.resolve_template(tokenizer)
    by_prompt = {p.prompt: p for p in prompts}
    assert len(examples) == len(prompts)
    rendered = {gen.render_prompt(tokenizer, template, text): row for text, row in by_prompt.items()}
    for ex in examples:
        first_trained = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
        row = rendered[tokenizer.decode(ex.input_ids[:first_trained])]  # the eval's own prompt text
        assert ex.input_ids[:first_trained] == gen.encode_prompt(tokenizer, template, row.prompt)  # and ids
        trained = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
        assert trained.startswith(row.reference) and trained[len(row.reference):].strip() == "<|im_end|>"


def test_loss_trend(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0},
                                                       {"step": 2, "loss": 1.5}, "oops"]))
    trend = loss_trend(path)
    assert trend["loss_fell"] is True and trend["first_loss"] == 2.0 and trend["last_step"] == 2
    path.write_text(json.dumps({"step": 1, "loss": 2.0}))
    assert loss_trend(path)["loss_fell"] is None
