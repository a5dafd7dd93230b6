"""KTO, ORPO and reward models through the pipeline (`lmpipeline run`), each after a short SFT stage on the
embedded tiny model and the quickstart data: the run finishes, its metrics carry the method's names, the
final folder loads, and `data inspect`, `validate` and `estimate` handle the stage. Then one run of each
on real third-party data with the real Qwen2.5 tokenizer (../shared; skipped without it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lmpipeline.cli import main
from lmpipeline.methods.rm import load_reward_model
from lmpipeline.methods.start import STAGE_ONLY_ADAPTER
from lmpipeline.models.adapter_chain import CHAIN_FILE
from tests.unit.evaluate.tiny import cached_tiny_model, one_thread

pytestmark = pytest.mark.integration

SHORT = {"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "max_seq_length": 128,
         "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8}

# Logged names per method (TRL's), train and eval.
METRICS = {
    "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"),
    "orpo": ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"),
    "rm": ("loss", "accuracy", "margin", "mean_reward"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory, quickstart_data):
    """The first rows of the quickstart's preference pairs: 6 to train on, 2 held out."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = (quickstart_data / "dpo_train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows[:6]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(rows[6:8]) + "\n")
    return folder


def write_config(tmp_path: Path, model: Path, stages: dict) -> Path:
    cfg = {"model_name_or_path": str(model), "output_dir": str(tmp_path / "run"), "stages": list(stages),
           "stage_configs": stages}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_ok(path: Path, method: str) -> tuple[dict, Path]:
    """Run the config; (the method stage's run.json entry, its folder), after the common checks."""
    assert main(["run", str(path)]) == 0
    out = Path(yaml.safe_load(path.read_text())["output_dir"])
    record = json.loads((out / "run.json").read_text())
    entry = record["stages"][method]
    assert entry["status"] == "done" and entry["trained"] is True
    assert entry["kind"] == method
    return entry, out / method


def logged(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a stage's metrics.jsonl."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "learning_rate" in r]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    return train, evals


def assert_method_metrics(stage_dir: Path, method: str, *, with_eval: bool) -> list[dict]:
    train, evals = logged(stage_dir)
    assert len(train) == 2
    for rec in train + evals[-1:]:
        prefix = "eval_" if rec in evals else ""
        names = [k for k in METRICS[method] if not (method == "kto" and not present(rec, prefix, k))]
        assert all(math.isfinite(rec[prefix + k]) for k in names), (method, rec)
    assert not with_eval or evals
    return train


def present(rec: dict, prefix: str, name: str) -> bool:
    """KTO's per-class means exist for the classes a record's batches held (as TRL's)."""
    classes = [c for c in ("chosen", "rejected") if rec.get(f"{prefix}count/{c}")]
    if name == "rewards/margins":
        return len(classes) == 2
    return not name.endswith(("/chosen", "/rejected")) or name.split("/")[1] in classes


def assert_commands_handle(path: Path, method: str, capsys) -> None:
    """`data inspect`, `validate` and `estimate` on the stage (offline: the model is a local folder)."""
    assert main(["data", "inspect", str(path), "--stage", method, "-n", "1"]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["estimate", str(path), "--json"]) == 0
    assert method in capsys.readouterr().out


def sft_stage(quickstart_data: Path) -> dict:
    return {"dataset_name_or_path": str(quickstart_data / "sft_train.jsonl"), "max_samples": 8,
            "assistant_only_loss": True, **SHORT}


@pytest.mark.parametrize("how", ["merge", "stack"])
def test_sft_then_kto(how, tmp_path, tiny_model, quickstart_data, small_pairs, capsys):
    """Preference pairs turned unpaired (each pair: a desirable and an undesirable example)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kto = {"dataset_name_or_path": str(small_pairs / "train.jsonl"),
           "eval_dataset_name_or_path": str(small_pairs / "eval.jsonl"), "eval_strategy": "steps", "eval_steps": 2,
           "beta": 0.1, "from_previous_stage": how, **SHORT}
    path = write_config(tmp_path, tiny_model, {"sft": sft_stage(quickstart_data), "kto": kto})
    entry, stage_dir = run_ok(path, "kto")
    train = assert_method_metrics(stage_dir, "kto", with_eval=True)
    # Step 1 reads the loss before any update: the fresh adapter (B = 0) makes the policy equal to its
    # reference (the SFT model: merged, adapter disabled; stacked, only the frozen SFT adapter active), so
    # every log-ratio is 0, z0 = 0 and each example's loss is 1 - sigmoid(0) = 1/2 exactly, its rewards 0
    # (fp32 sums of identical forwards).
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert train[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert entry["notes"]["reference"] == ("adapter disabled (= SFT model)" if how == "merge"
                                           else "only the frozen 'sft' adapter active (= SFT model)")
    assert entry["data"]["train_desirable"] == entry["data"]["train_undesirable"] == 6

    # final/ is the SFT and KTO deltas summed into one adapter: plain PEFT on the base equals the SFT
    # model with the KTO delta alone (final/this_stage_only) on top.
    final = stage_dir / "final"
    chain = json.loads((final / CHAIN_FILE).read_text())
    assert [a["stage"] for a in chain["adapters"]] == ["kto"] and [a["stage"] for a in chain["includes"]] == ["sft"]
    ids = torch.tensor([[5, 6, 7]])
    combined = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                         str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "sft" / "final")).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(final / STAGE_ONLY_ADAPTER)).eval()
    with torch.no_grad():
        assert torch.allclose(combined(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
    if how == "merge":
        assert_commands_handle(path, "kto", capsys)


def test_kto_precomputed_reference_matches_step_one(tmp_path, tiny_model, small_pairs):
    """The reference computed once before training (fixed KL partners) gives step 1 the same identity."""
    kto = {"dataset_name_or_path": str(small_pairs / "train.jsonl"), "precompute_ref_log_probs": True, **SHORT}
    path = write_config(tmp_path, tiny_model, {"kto": kto})
    entry, stage_dir = run_ok(path, "kto")
    train = assert_method_metrics(stage_dir, "kto", with_eval=False)
    # As above, but the reference values come from other batches (data order, eval batch size): padding
    # differs, so the fp32 sums of up to 128 token log-probs may differ by a few ulps each (|r| <~ 1e-4);
    # the loss moves by at most beta/4 * |r| = 2.5e-6.
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert entry["notes"]["reference"].endswith("precomputed once before training")


def test_sft_then_orpo(tmp_path, tiny_model, quickstart_data, small_pairs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    orpo = {"dataset_name_or_path": str(small_pairs / "train.jsonl"), "beta": 0.1, **SHORT}
    path = write_config(tmp_path, tiny_model, {"sft": sft_stage(quickstart_data), "orpo": orpo})
    entry, stage_dir = run_ok(path, "orpo")
    train = assert_method_metrics(stage_dir, "orpo", with_eval=False)
    # loss = nll + beta * (-mean log sigmoid(log odds ratio)), both logged as per-pair means of one micro-batch.
    first = train[0]
    assert first["loss"] == pytest.approx(first["nll_loss"] - 0.1 * first["log_odds_ratio"], rel=1e-5)
    assert entry["notes"]["dropout_disabled_modules"] >= 0
    final = stage_dir / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "sft" / "final")).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(final))
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    assert_commands_handle(path, "orpo", capsys)


def test_sft_then_reward_model(tmp_path, tiny_model, quickstart_data, small_pairs, capsys):
    rm = {"dataset_name_or_path": str(small_pairs / "train.jsonl"),
          "eval_dataset_name_or_path": str(small_pairs / "eval.jsonl"), "eval_strategy": "steps", "eval_steps": 2,
          **SHORT}
    path = write_config(tmp_path, tiny_model, {"sft": sft_stage(quickstart_data), "rm": rm})
    entry, stage_dir = run_ok(path, "rm")
    assert_method_metrics(stage_dir, "rm", with_eval=True)
    final = stage_dir / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    chain = json.loads((final / CHAIN_FILE).read_text())
    assert [a["stage"] for a in chain["adapters"]] == ["sft", "rm"]
    model, tok = load_reward_model(final)
    # The reward model started from the SFT model: under its own adapter, the backbone is base + SFT delta.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                    str(tmp_path / "run" / "sft" / "final")).merge_and_unload()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    sft_weight = sft.model.layers[0].self_attn.q_proj.weight
    base_weight = AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(sft_weight, base_weight)  # SFT's two steps moved it
    assert torch.equal(q_proj.base_layer.weight, sft_weight)
    batch = tok(["<|im_start|>user\nhello<|im_end|>\n", "<|im_start|>user\nhi there<|im_end|>\n"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    # The model card's loading code runs as written and scores like load_reward_model.
    card = (final / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "AutoModelForSequenceClassification" in code and "generate" not in code
    namespace: dict = {}
    exec(code.replace('device_map="auto"', 'dtype=torch.float32'), {"torch": torch}, namespace)
    card_model = namespace["model"].eval()
    with torch.no_grad():
        assert torch.allclose(card_model(**batch).logits, scores, atol=1e-5)
    assert_commands_handle(path, "rm", capsys)


# ----------------------------------------------------------------------------------------------
# Real data, real tokenizer


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory, shared_data):
    return cached_tiny_model(tmp_path_factory, shared_data)


@pytest.mark.parametrize("method, data", [
    ("kto", "kto/llamafactory_kto_en_demo.json"),
    ("orpo", "preference/llamafactory_dpo_en_demo.json"),
    ("rm", "preference/llamafactory_v1_dpo_demo.jsonl"),
])
def test_real_data_and_tokenizer(method, data, tmp_path, shared_data, qwen_tiny, capsys):
    stage = {**SHORT, "dataset_name_or_path": str(shared_data / data), "max_samples": 6, "max_seq_length": 256,
             "max_prompt_length": 128}
    path = write_config(tmp_path, qwen_tiny, {method: stage})
    entry, stage_dir = run_ok(path, method)
    assert_method_metrics(stage_dir, method, with_eval=False)
    if method == "kto":  # the demo file's rows are labelled both ways
        assert entry["data"]["train_desirable"] > 0 and entry["data"]["train_undesirable"] > 0
    if method == "rm":
        model, tok = load_reward_model(stage_dir / "final")
        with torch.no_grad():
            assert model(**tok(["a reply"], return_tensors="pt")).logits.shape == (1, 1)
    else:
        assert (stage_dir / "final" / "adapter_model.safetensors").exists()
    assert_commands_handle(path, method, capsys)


def test_merge_refuses_a_reward_model(tmp_path, tiny_model, small_pairs, capsys):
    """merge writes a causal LM: after rm it stops with the key instead of dropping the score head."""
    rm = {"dataset_name_or_path": str(small_pairs / "train.jsonl"), **SHORT, "max_steps": 1}
    path = write_config(tmp_path, tiny_model, {"rm": rm, "merge": {}})
    assert main(["run", str(path)]) != 0
    err = capsys.readouterr().err
    assert "would drop its head" in err and "AutoModelForSequenceClassification" in err
    assert not (tmp_path / "run" / "merge" / "final").exists()


def test_eval_leaves_a_reward_model_out(tmp_path, tiny_model, small_pairs, quickstart_data):
    """eval measures loss and generations: after rm it compares the causal LMs only (here the base)."""
    golden = tmp_path / "golden.jsonl"
    golden.write_text("\n".join((quickstart_data / "golden.jsonl").read_text().splitlines()[:2]) + "\n")
    rm = {"dataset_name_or_path": str(small_pairs / "train.jsonl"), **SHORT, "max_steps": 1}
    path = write_config(tmp_path, tiny_model, {"rm": rm, "eval": {"golden_set": str(golden), "max_new_tokens": 4}})
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base"]
