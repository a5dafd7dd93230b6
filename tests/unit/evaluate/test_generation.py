"""Model resolution (run, stage, adapter, chain, package folders), prompt files, batched generation."""

import json
import shutil

import pytest
import torch

from lmpipeline.errors import UserError
from lmpipeline.evaluate import generation as gen
from lmpipeline.models.adapter_chain import CHAIN_FILE
from tests.unit.evaluate.tiny import make_adapter, write_golden


def test_run_folder_resolves_to_the_latest_stage_with_its_adapter_chain(run_dir, tiny_llama):
    spec = gen.resolve_model(run_dir)
    assert spec.label == "dpo"
    assert spec.base == str(tiny_llama)
    assert [p.resolve() for p in spec.adapters] == [(run_dir / "sft" / "final").resolve(),
                                                    (run_dir / "dpo" / "final").resolve()]
    assert spec.stage_names == ["sft", "dpo"]
    assert spec.tokenizer == str(run_dir / "dpo" / "final")


@pytest.mark.parametrize("sub", ["sft", "sft/final"])
def test_stage_folder_resolves_to_that_stage(run_dir, sub):
    spec = gen.resolve_model(run_dir / sub)
    assert spec.stage_names == ["sft"] and len(spec.adapters) == 1


def test_chain_without_chain_file_follows_run_json_model_links(run_dir, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy)
    (copy / "dpo" / "final" / CHAIN_FILE).unlink()
    # Recorded paths still point at the original folder; the chain must use the copy's stages by name.
    spec = gen.resolve_model(copy)
    assert spec.stage_names == ["sft", "dpo"]
    assert spec.adapters[0] in (copy / "sft" / "final", run_dir / "sft" / "final")


def test_moved_run_relocates_stage_folders(run_dir, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy)
    data = json.loads((copy / "run.json").read_text())
    for entry in data["stages"].values():
        entry["final_dir"] = "/nonexistent/" + entry["final_dir"]
        entry["model"] = "/nonexistent/" + entry["model"]
    (copy / "run.json").write_text(json.dumps(data))
    (copy / "dpo" / "final" / CHAIN_FILE).unlink()
    spec = gen.resolve_model(copy, base_model=str(data["config"]["model_name_or_path"]))
    assert [a.resolve() for a in spec.adapters] == [(copy / "sft" / "final").resolve(), (copy / "dpo" / "final").resolve()]


def test_adapter_folder_names_its_base_and_base_model_overrides(run_dir, tiny_llama, tmp_path):
    spec = gen.resolve_model(run_dir / "sft" / "final")
    assert spec.base == str(tiny_llama)
    alone = tmp_path / "alone"
    shutil.copytree(run_dir / "sft" / "final", alone)
    assert gen.resolve_model(alone).base == str(tiny_llama)
    assert gen.resolve_model(alone, base_model="/some/copy").base == "/some/copy"


def test_adapter_on_adapter_is_followed(tiny_llama, run_dir, tmp_path):
    second = make_adapter(tiny_llama, tmp_path / "second", seed=5, base_name=str(run_dir / "sft" / "final"))
    spec = gen.resolve_model(second)
    assert spec.base == str(tiny_llama)
    assert spec.adapters == [run_dir / "sft" / "final", second]


def test_full_model_and_errors(tiny_llama, tmp_path):
    spec = gen.resolve_model(tiny_llama)
    assert spec.base == str(tiny_llama) and spec.adapters == []
    with pytest.raises(UserError, match="does not exist"):
        gen.resolve_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        gen.resolve_model(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {}, "stages": {"sft": {"kind": "sft", "status": "failed"}}}))
    with pytest.raises(UserError, match="no finished stage"):
        gen.resolve_model(run)


def test_read_prompts_native_and_sft_formats(tmp_path, shared_data):
    golden = write_golden(tmp_path / "g.jsonl")
    rows = gen.read_prompts(golden, system_prompt="Be brief.")
    assert [r.reference for r in rows] == ["4", "Blue", "Bonjour", None]
    assert rows[0].prompt[0] == {"role": "system", "content": "Be brief."}
    assert gen.prompt_text(rows[1].prompt) == "Name a colour."

    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}) + "\n")
    (row,) = gen.read_prompts(alpaca)
    assert row.reference == "3" and row.prompt[-1]["role"] == "user" and "1 and 2" in row.prompt[-1]["content"]

    conv = tmp_path / "m.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    (row,) = gen.read_prompts(conv)
    assert row.prompt == [{"role": "user", "content": "hi"}] and row.reference == "yo"

    mt = gen.read_prompts(shared_data / "eval_prompts" / "fastchat_mt_bench_question.jsonl", max_samples=2)
    assert len(mt) == 2 and isinstance(mt[0].prompt, str)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(UserError, match="prompt"):
        gen.read_prompts(bad)


def test_batched_left_padded_greedy_equals_one_by_one(tiny_llama):
    model, tok = gen.load_for_inference(tiny_llama, dtype="float32")
    template = gen.resolve_template(tok)
    prompts = ["hi", "What is the capital of France, and why?", [{"role": "user", "content": "x"}]]
    batched = gen.generate_batch(model, tok, prompts, chat_template=template, max_new_tokens=5, batch_size=3)
    single = [gen.generate_batch(model, tok, [p], chat_template=template, max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert all(g.num_tokens <= 5 for g in batched)


def test_stop_tokens_include_the_end_of_turn(tiny_llama):
    _, tok = gen.load_for_inference(tiny_llama, dtype="float32")
    stops = gen.stop_token_ids(tok, gen.resolve_template(tok))
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops


def test_generation_stops_at_end_of_turn(tiny_llama):
    model, tok = gen.load_for_inference(tiny_llama, dtype="float32")
    template = gen.resolve_template(tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    # Make the end-of-turn token the most likely next token everywhere.
    logits_bias = torch.zeros(model.config.vocab_size)
    logits_bias[eot] = 1e4
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + logits_bias)
    try:
        (g,) = gen.generate_batch(model, tok, ["hi"], chat_template=template, max_new_tokens=6)
    finally:
        hook.remove()
    assert g.finished and g.num_tokens == 1 and g.text == ""


def test_chain_from_stage_outputs_without_run_json(tmp_path):
    from lmpipeline.context import StageOutput

    a, b, full = tmp_path / "a", tmp_path / "b", tmp_path / "full"
    done = [StageOutput("sft", "sft", a, True), StageOutput("eval", "eval", None, False), StageOutput("dpo", "dpo", b, True)]
    spec = gen.spec_from_completed(done, "base-id")
    assert spec.base == "base-id" and spec.adapters == [a, b] and spec.stage_names == ["sft", "dpo"]
    spec = gen.spec_from_completed([StageOutput("sft", "sft", full, False), StageOutput("dpo", "dpo", b, True)], "base-id")
    assert spec.base == str(full) and spec.adapters == [b]


def test_raw_text_prompts_without_a_template(tiny_llama):
    _, tok = gen.load_for_inference(tiny_llama, dtype="float32")
    assert gen.render_prompt(tok, None, "plain text") == "plain text"
    with pytest.raises(UserError, match="no chat template"):
        gen.render_prompt(tok, None, [{"role": "user", "content": "hi"}])
    tok.chat_template = None
    assert gen.resolve_template(tok) is None
    with pytest.raises(UserError, match="chat_template"):
        gen.resolve_template(tok, chat_template="no-such-template")
    from lmpipeline.evaluate.chat import ChatSession

    with pytest.raises(UserError, match="no chat template"):
        ChatSession(None, tok)


def test_chain_rooted_at_a_full_weights_stage_ignores_the_base_override(tiny_llama, tmp_path):
    from tests.unit.evaluate.tiny import write_chain_file

    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "sft" / "final")  # a full fine-tune
    sft2 = make_adapter(tiny_llama, run / "sft2" / "final", seed=3)
    dpo = make_adapter(tiny_llama, run / "dpo" / "final", seed=4)
    write_chain_file(dpo, run / "sft" / "final", [("sft2", sft2)], "dpo")
    old = "/old/place/run/sft/final"  # the run was moved after training
    data = json.loads((dpo / CHAIN_FILE).read_text())
    data["base_model"] = old
    (dpo / CHAIN_FILE).write_text(json.dumps(data))
    stages = {"sft": {"kind": "sft", "status": "done", "final_dir": old, "adapter": False, "model": str(tiny_llama)},
              "sft2": {"kind": "sft", "status": "done", "final_dir": str(sft2), "adapter": True, "model": old},
              "dpo": {"kind": "dpo", "status": "done", "final_dir": str(dpo), "adapter": True, "model": str(sft2)}}
    (run / "run.json").write_text(json.dumps({"config": {"model_name_or_path": str(tiny_llama)}, "stages": stages}))
    for override in (None, "/a/local/copy/of/the/base"):
        spec = gen.resolve_model(run, base_model=override)
        assert spec.base == str(run / "sft" / "final")
        assert [a.resolve() for a in spec.adapters] == [sft2.resolve(), dpo.resolve()]
    (dpo / CHAIN_FILE).unlink()
    spec = gen.resolve_model(run / "sft2")
    assert spec.base == str(run / "sft" / "final") and spec.adapters == [sft2]
