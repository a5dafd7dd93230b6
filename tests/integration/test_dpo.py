"""The dpo stage on a tiny model, on CPU: step-0 sanity, parity with TRL, learning on held-out pairs,
the reference-log-prob cache, and starting after an SFT adapter (merge and stack).

The model is a random 2-layer Llama (hidden 64) with a 43-token word-level tokenizer built here, so a
hundred DPO steps take seconds; one data test uses the real Qwen2.5 tokenizer from ../shared.
Task: prompt `repeat : a b`, chosen `a b`, rejected verbose (`a b j`) or off-topic (`j k`), j and k
from junk words never seen in prompts or chosen replies. Eval prompts are word pairs absent from
training.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipeline.config.schema import DPOConfig
from lmpipeline.context import StageOutput
from lmpipeline.data.templates import builtin_template
from lmpipeline.data.preference import build_preference_data, collate_pairs, make_pair_plans, pair_as_example
from lmpipeline.methods import dpo as dpo_mod
from lmpipeline.methods.dpo import DPOObjective, DPOStage
from lmpipeline.methods.start import STAGE_ONLY_ADAPTER, resolve_start
from lmpipeline.models.adapter_chain import CHAIN_FILE

pytestmark = pytest.mark.integration

WORDS = ("apple bird cloud dog echo fish gold hill iron jade kite lamp moon nest oak pearl quill rose sun tree "
         "umber vine wolf yarn zinc amber brick coral dune ember").split()
JUNK = WORDS[-8:]
PROMPT_WORDS = WORDS[:-8]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
OTHER = ["system", "user", "assistant", "repeat", ":", "You", "are", "concise", "."]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + OTHER + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = builtin_template("chatml")  # TRL renders its own copy of the rows with it
    tok.save_pretrained(folder)
    return tok


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def make_rows(n: int, seed: int, exclude=frozenset()):
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.sample(PROMPT_WORDS, 2)
        if (a, b) in exclude or (a, b) in seen:
            continue
        seen.add((a, b))
        j, k = rng.sample(JUNK, 2)
        rejected = f"{a} {b} {j}" if rng.random() < 0.5 else f"{j} {k}"
        rows.append({"prompt": [{"role": "user", "content": f"repeat : {a} {b}"}],
                     "chosen": [{"role": "assistant", "content": f"{a} {b}"}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows, seen


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer + saved random model + train/eval files, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("dpo")
    model_dir = root / "model"
    tok = make_tokenizer(model_dir)
    make_model(len(tok)).save_pretrained(model_dir)
    train_rows, seen = make_rows(240, seed=1)
    eval_rows, _ = make_rows(48, seed=2, exclude=seen)
    return {"root": root, "model_dir": model_dir, "tokenizer": tok,
            "train": write_jsonl(root / "train.jsonl", train_rows), "eval": write_jsonl(root / "eval.jsonl", eval_rows)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spin-waiting makes
    # them 10x slower; one thread keeps this module at a few seconds a test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPIPELINE_CACHE_DIR", str(tmp_path / "cache"))


def make_cfg(world, out: Path, **kw) -> DPOConfig:
    base = dict(stage_name="dpo", output_dir=str(out), dataset_name_or_path=str(world["train"]),
                eval_dataset_name_or_path=str(world["eval"]), chat_template="chatml", max_seq_length=64,
                learning_rate=1e-3, max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=48,
                lora_r=8, lora_alpha=16, save_strategy="no", logging_steps=1, lr_scheduler_type="constant")
    base.update(kw)
    return DPOConfig(**base)


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fresh_tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world["model_dir"])


def batch_of(world, cfg, n=6):
    tok = fresh_tokenizer(world)
    data = build_preference_data(cfg, tok)
    return collate_pairs(data.train[:n], tok.pad_token_id), data, tok


# ------------------------------------------------------------------------------------------- data


def test_batch_layout_and_completion_mask(world, tmp_path):
    batch, data, tok = batch_of(world, make_cfg(world, tmp_path / "o"), n=2)
    pair = data.train[0]
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    n_prompt, n_chosen = len(pair.prompt_ids), len(pair.chosen_ids)
    assert batch["input_ids"][0, :n_prompt + n_chosen].tolist() == pair.prompt_ids + pair.chosen_ids
    assert batch["completion_mask"][0].tolist()[:n_prompt + n_chosen] == [0] * n_prompt + [1] * n_chosen
    assert batch["input_ids"][2, n_prompt:n_prompt + len(pair.rejected_ids)].tolist() == pair.rejected_ids
    # the completion is the reply plus the end of turn, nothing of the prompt
    assert tok.convert_ids_to_tokens(pair.chosen_ids)[-1] == "<|im_end|>"
    example = pair_as_example(pair, "rejected")
    assert example.input_ids == pair.prompt_ids + pair.rejected_ids and example.num_trained == len(pair.rejected_ids)


def test_pair_plans_are_deterministic_and_carry_reference_logps(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "o", per_device_eval_batch_size=20)
    tok = fresh_tokenizer(world)
    data = build_preference_data(cfg, tok)
    ref_train = np.arange(2 * len(data.train), dtype=np.float64).reshape(-1, 2)
    train_plan, eval_plan = make_pair_plans(cfg, data, tok, ref_train=ref_train)
    epoch0 = train_plan.epoch_batches(0)
    assert epoch0 == train_plan.epoch_batches(0) != train_plan.epoch_batches(1)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(data.train)))
    batch = train_plan.collate(epoch0[0])
    assert batch["ref_chosen_logps"].tolist() == [2.0 * i for i in epoch0[0]]
    assert "ref_chosen_logps" not in eval_plan.collate(eval_plan.epoch_batches(0)[0])
    # eval batches are split between processes, every pair exactly once
    shards = [make_pair_plans(cfg, data, tok, rank=r, world=2)[1].epoch_batches(0) for r in (0, 1)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(len(data.eval)))


def test_real_tokenizer_sharegpt_preference(shared_data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-0.5b-instruct")
    path = shared_data / "preference" / "llamafactory_dpo_en_demo.json"
    cfg = DPOConfig(stage_name="dpo", output_dir=str(tmp_path), max_samples=20, max_seq_length=256,
                    max_prompt_length=64, dataset_name_or_path=str(path))
    data = build_preference_data(cfg, tok)
    assert data.formats == ["sharegpt_preference"] and len(data.train) == 20
    for pair in data.train:
        assert len(pair.prompt_ids) <= 64
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 256
        assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert data.report.truncated > 0  # long replies were cut and counted
    assert build_preference_data(cfg, tok).cache_hit


def test_quickstart_preference_data_tokenises(shared_data, quickstart_data, tmp_path):
    from transformers import AutoTokenizer

    train = quickstart_data / "dpo_train.jsonl"
    if not train.exists():
        pytest.skip("quickstart data not generated yet (scripts/make_quickstart_data.py)")
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-0.5b-instruct")
    cfg = DPOConfig(stage_name="dpo", output_dir=str(tmp_path), dataset_name_or_path=str(train), max_samples=64,
                    eval_dataset_name_or_path=str(quickstart_data / "dpo_eval.jsonl"), max_seq_length=256)
    data = build_preference_data(cfg, tok)
    assert len(data.train) == 64 and data.eval and data.report.skipped_invalid == 0
    for pair in data.train + data.eval:
        assert tok.convert_ids_to_tokens(pair.chosen_ids)[-1] == "<|im_end|>"
        assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
        assert pair.chosen_ids != pair.rejected_ids


TINY_CHAT = Path(__file__).resolve().parents[2] / "lmpipeline" / "assets" / "tiny-chat"


@pytest.mark.skipif(not (TINY_CHAT / "config.json").exists(), reason="the embedded tiny-chat model is not built yet")
def test_quickstart_dpo_on_tiny_chat_improves_heldout_rewards(tiny_model, quickstart_data, tmp_path):
    out = tmp_path / "qs"
    cfg = DPOConfig(stage_name="dpo", output_dir=str(out),
                    dataset_name_or_path=str(quickstart_data / "dpo_train.jsonl"),
                    eval_dataset_name_or_path=str(quickstart_data / "dpo_eval.jsonl"), max_samples=1500,
                    max_seq_length=128, max_steps=100, per_device_train_batch_size=16, per_device_eval_batch_size=50,
                    learning_rate=2e-3, beta=0.5, save_strategy="no", logging_steps=20)
    result = DPOStage(cfg).execute(model_name_or_path=str(tiny_model))
    assert metrics_lines(out)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.metrics["eval_rewards/accuracies"] > 0.6 and result.metrics["eval_loss"] < math.log(2)


# ------------------------------------------------------------------------------------ objective


def lora_model(world, perturb: bool = False):
    from peft import LoraConfig, get_peft_model

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    if perturb:
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
    return model


def test_step0_sigmoid_loss_is_ln2_and_rewards_zero(world, tmp_path):
    batch, _, _ = batch_of(world, make_cfg(world, tmp_path / "o"))
    model = lora_model(world)  # a fresh LoRA: policy == reference
    loss, m = DPOObjective(reference="adapter_disabled").loss(model, batch, total_units=6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["units"] == 6 and m["loss"] / 6 == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == pytest.approx(0.0, abs=1e-6)
    # full fine-tuning: a frozen copy as reference gives the same at step 0
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    obj = DPOObjective(reference="frozen_copy", ref_model=AutoModelForCausalLM.from_pretrained(world["model_dir"]))
    assert obj.loss(full, batch, 6)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_logps_paths_agree_in_values_and_gradients(world, tmp_path):
    from transformers import AutoModelForCausalLM

    batch, _, _ = batch_of(world, make_cfg(world, tmp_path / "o"))
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"])  # full weights: the LM head gets gradients too
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert dpo_mod.choose_logps_path(model, batch) == "fused"
    weights = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    got = {}
    for name, kw in {"fused": dict(fused=True), "kept": {}, "full": dict(logits_to_keep=False)}.items():
        model.zero_grad()
        logps, tokens = dpo_mod.completion_logps(model, *args, **kw)
        (logps * weights).sum().backward()
        got[name] = (logps.detach(), tokens, {k: p.grad.clone() for k, p in model.named_parameters()})
    for name in ("kept", "full"):
        assert torch.allclose(got["fused"][0], got[name][0], atol=1e-5) and torch.equal(got["fused"][1], got[name][1])
        for k, g in got["fused"][2].items():
            assert torch.allclose(g, got[name][2][k], atol=1e-5, rtol=1e-4), k
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: same to bf16 accuracy
        fused = dpo_mod.completion_logps(model, *args, fused=True)[0]
        logits = dpo_mod.completion_logps(model, *args)[0]
    assert torch.allclose(fused, logits, rtol=2e-2)
    model.config.final_logit_softcapping = 30.0  # logits != lm_head(hidden): never fused
    assert dpo_mod.choose_logps_path(model, batch) == "logits"


# ---------------------------------------------------------------------------------- TRL parity

TRL_LOSSES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _trl_trainer(world, tmp_path, model, ref_model=None, peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    rows, _ = make_rows(4, seed=5)
    args = TRLDPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.1, max_length=None,
                        per_device_train_batch_size=2, use_cpu=True, bf16=False, disable_dropout=True,
                        save_strategy="no", logging_strategy="no")
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=fresh_tokenizer(world), peft_config=peft_config)


def _compare_with_trl(trainer, model, objective, batch, loss_type, smoothing):
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], smoothing
    trainer._metrics["train"].clear()
    model.train()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, dict(batch), return_outputs=False)
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    objective.loss_type = loss_type
    objective.params = dpo_mod.losses.LossParams(beta=0.1, label_smoothing=smoothing)
    with torch.no_grad():
        ours_loss, m = objective.loss(model, batch, total_units=objective.count(batch))
    n = m["units"]
    diffs = {"loss": abs(ours_loss.item() - trl_loss.item())}
    for k in METRICS:
        diffs[k] = abs(m[k] / n - trl[k])
    return diffs


@pytest.mark.parametrize("loss_type,smoothing", TRL_LOSSES)
def test_matches_trl_dpo_trainer_lora(world, tmp_path, loss_type, smoothing, trl_lora):
    trainer, batch = trl_lora
    objective = DPOObjective(reference="adapter_disabled")
    diffs = _compare_with_trl(trainer, trainer.model, objective, batch, loss_type, smoothing)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("loss_type,smoothing", TRL_LOSSES)
def test_matches_trl_dpo_trainer_full(world, tmp_path, loss_type, smoothing, trl_full):
    trainer, batch = trl_full
    objective = DPOObjective(reference="frozen_copy", ref_model=trainer.ref_model)
    diffs = _compare_with_trl(trainer, trainer.model, objective, batch, loss_type, smoothing)
    assert max(diffs.values()) < 1e-4, diffs


def _parity_batch(world, tmp_path):
    batch, _, _ = batch_of(world, make_cfg(world, tmp_path / "parity"), n=6)
    return batch


@pytest.fixture(scope="module")
def trl_lora(world, tmp_path_factory):
    pytest.importorskip("trl")
    from peft import LoraConfig

    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("trl_lora")
    base = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    trainer = _trl_trainer(world, tmp, base, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules="all-linear"))
    torch.manual_seed(3)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:  # policy != reference, else every reward is 0
            p.data.normal_(0, 0.2)
    yield trainer, _parity_batch(world, tmp)
    _reset_accelerate()


@pytest.fixture(scope="module")
def trl_full(world, tmp_path_factory):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("trl_full")
    policy = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    ref = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    torch.manual_seed(4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trainer = _trl_trainer(world, tmp, policy, ref_model=ref)
    yield trainer, _parity_batch(world, tmp)
    _reset_accelerate()


def _reset_accelerate():
    # transformers' Trainer leaves accelerate's process-global state behind; later stages must not inherit it.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------- training


def test_dpo_learns_preferences_on_heldout_pairs(world, tmp_path):
    out = tmp_path / "learn"
    cfg = make_cfg(world, out, max_steps=200, logging_steps=50)
    result = DPOStage(cfg).execute(model_name_or_path=str(world["model_dir"]))
    lines = metrics_lines(out)
    step0 = lines[0]
    assert step0["step"] == 0 and step0["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step0["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    final = result.metrics
    assert final["eval_rewards/accuracies"] >= 0.9, final
    assert final["eval_rewards/margins"] > 0.05 and final["eval_loss"] < math.log(2) - 0.05
    assert result.notes["reference"] == "adapter disabled (= starting model)"
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert not (out / "final" / CHAIN_FILE).exists()


def test_precomputed_reference_is_cached_and_reused(world, tmp_path, monkeypatch):
    cfg = make_cfg(world, tmp_path / "a", precompute_ref_log_probs=True, max_steps=3)
    first = DPOStage(cfg).execute(model_name_or_path=str(world["model_dir"]))
    assert first.notes["ref_cache"] == "miss"
    assert metrics_lines(tmp_path / "a")[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)

    def fail(*a, **k):
        raise AssertionError("reference log-probs recomputed despite a cache entry")

    monkeypatch.setattr(dpo_mod, "compute_reference_logps", fail)
    second = DPOStage(cfg.model_copy(update={"output_dir": str(tmp_path / "b")})).execute(
        model_name_or_path=str(world["model_dir"]))
    assert second.notes["ref_cache"] == "hit" and second.notes["ref_cache_key"] == first.notes["ref_cache_key"]
    # same data, same reference (the cache holds the float32 log-probs exactly, as float64), same process
    # and kernels: the two runs train bitwise identically
    a, b = metrics_lines(tmp_path / "a"), metrics_lines(tmp_path / "b")
    assert [x.get("loss") for x in a] == [x.get("loss") for x in b]
    assert first.metrics["eval_loss"] == second.metrics["eval_loss"]


def test_reference_cache_key_follows_weights_and_data(world, tmp_path):
    import os

    from lmpipeline.methods import ref_cache

    model_dir = tmp_path / "m"
    make_model(len(world["tokenizer"])).save_pretrained(model_dir)
    ref = ref_cache.reference_fingerprint(base=str(model_dir), settings={"bf16": False})
    key = ref_cache.cache_key(ref, {"train": "a"})
    assert key == ref_cache.cache_key(ref_cache.reference_fingerprint(base=str(model_dir), settings={"bf16": False}),
                                      {"train": "a"})
    assert key != ref_cache.cache_key(ref, {"train": "b"})  # other pairs
    assert key != ref_cache.cache_key(ref_cache.reference_fingerprint(base=str(model_dir), settings={"bf16": True}),
                                      {"train": "a"})  # other precision
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten weights
    assert key != ref_cache.cache_key(ref_cache.reference_fingerprint(base=str(model_dir), settings={"bf16": False}),
                                      {"train": "a"})
    saved = ref_cache.RefLogps(np.asarray([[1.0, 2.0]]), None)
    ref_cache.save(key, saved, {"why": "test"})
    assert ref_cache.load(key).train.tolist() == [[1.0, 2.0]] and ref_cache.load("0" * 32) is None


def test_precomputed_values_equal_on_the_fly_reference(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "o", precompute_ref_log_probs=True)
    tok = fresh_tokenizer(world)
    data = build_preference_data(cfg, tok)
    model = lora_model(world, perturb=True)
    from accelerate import Accelerator

    obj = DPOObjective(reference="adapter_disabled")
    ref = dpo_mod.compute_reference_logps(obj, model, data.train[:10], cfg, tok, Accelerator())
    batch = collate_pairs(data.train[:10], tok.pad_token_id, ref)
    live = obj.loss(model, batch, 10)[1]
    obj.reference = "precomputed"
    pre = obj.loss(model, batch, 10)[1]
    assert all(float(pre[k]) == pytest.approx(float(live[k]), abs=1e-5) for k in live)


# ------------------------------------------------------------------------------- after SFT


@pytest.fixture()
def sft_stage(world, tmp_path):
    """A previous SFT stage's output: a random (non-zero) LoRA adapter + tokenizer in final/."""
    from peft import LoraConfig, get_peft_model

    from transformers import AutoModelForCausalLM

    final = tmp_path / "sft" / "final"
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(final)
    world["tokenizer"].save_pretrained(final)
    return StageOutput(name="sft", kind="sft", final_dir=final, adapter=True)


def _rebuild_from_chain(world, final: Path):
    from peft import PeftModel

    from transformers import AutoModelForCausalLM

    chain = json.loads((final / CHAIN_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(chain["base_model"])
    for entry in chain["adapters"]:
        model = PeftModel.from_pretrained(model, str((final / entry["path"]).resolve())).merge_and_unload()
    return model.eval()


@pytest.mark.parametrize("how", ["merge", "stack"])
def test_after_sft_reference_is_sft_model_and_chain_rebuilds(world, tmp_path, sft_stage, how):
    out = tmp_path / f"dpo_{how}"
    cfg = make_cfg(world, out, from_previous_stage=how, max_steps=3, learning_rate=5e-3)
    stage = DPOStage(cfg)
    result = stage.execute(model_name_or_path=str(world["model_dir"]), previous=sft_stage)
    notes = result.notes
    assert notes["adapter_base_chain"] == [str(sft_stage.final_dir.resolve())]
    assert "SFT model" in notes["reference"]
    # step 0: policy = SFT model (+ zero LoRA) = reference -> ln 2
    assert metrics_lines(out)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the reference is NOT the bare base: SFT log-probs differ from the base's
    batch, _, tok = batch_of(world, cfg)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model_dir"]).eval()
    with torch.no_grad():
        ref = stage.objective.reference_logps(stage.model, batch)
        bare = dpo_mod.completion_logps(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]
    assert (ref - bare).abs().max() > 1e-3
    # final/ is one adapter, the SFT and DPO deltas summed: plain PEFT on the base gives the trained
    # policy (and so does following the chain file, which now applies final/ alone)
    final = out / "final"
    chain = json.loads((final / CHAIN_FILE).read_text())
    assert [e["stage"] for e in chain["adapters"]] == ["dpo"] and chain["trained_as"] == how
    assert [e["stage"] for e in chain["includes"]] == ["sft"]
    assert (final / STAGE_ONLY_ADAPTER / "adapter_config.json").is_file()
    from peft import PeftModel

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model_dir"]), str(final)).eval()
    rebuilt = _rebuild_from_chain(world, final)
    stage.model.eval()
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        trained = dpo_mod.completion_logps(stage.model, *args)[0]
        again = dpo_mod.completion_logps(rebuilt, *args)[0]
        with_peft = dpo_mod.completion_logps(plain, *args)[0]
    # One summed adapter vs the adapters applied in turn: fp32 rounding of a few added deltas per weight.
    assert torch.allclose(trained, again, atol=1e-4) and torch.allclose(trained, with_peft, atol=1e-4)
    if how == "stack":  # only the new adapter is saved; the SFT one is referenced by the chain
        assert not (final / "sft").exists()
        return
    # a second DPO stage after this one follows the chain: base + sft + dpo merged, a new adapter on top
    out2 = tmp_path / "dpo2"
    again_stage = DPOStage(make_cfg(world, out2, stage_name="dpo2", max_steps=2, learning_rate=5e-3))
    again_stage.execute(model_name_or_path=str(world["model_dir"]),
                        previous=StageOutput(name="dpo", kind="dpo", final_dir=final, adapter=True))
    chain2 = json.loads((out2 / "final" / CHAIN_FILE).read_text())
    assert [e["stage"] for e in chain2["adapters"]] == ["dpo2"]
    assert [e["stage"] for e in chain2["includes"]] == ["sft", "dpo"]
    assert metrics_lines(out2)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    again_stage.model.eval()
    with torch.no_grad():
        trained2 = dpo_mod.completion_logps(again_stage.model, *args)[0]
        rebuilt2 = dpo_mod.completion_logps(_rebuild_from_chain(world, out2 / "final"), *args)[0]
    assert torch.allclose(trained2, rebuilt2, atol=1e-4)


def test_full_fine_tuning_uses_a_frozen_copy(world, tmp_path):
    out = tmp_path / "full"
    result = DPOStage(make_cfg(world, out, use_lora=False, max_steps=2, learning_rate=1e-4)).execute(
        model_name_or_path=str(world["model_dir"]))
    assert result.notes["reference"] == "frozen copy of the starting model" and not result.adapter
    assert metrics_lines(out)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "final" / "model.safetensors").exists() and not (out / "final" / CHAIN_FILE).exists()
    assert result.metrics["eval_loss"] < math.log(2)


def test_adapter_folder_as_model_means_start_after_it(world, tmp_path, sft_stage):
    cfg = make_cfg(world, tmp_path / "o")
    start = resolve_start(cfg, str(sft_stage.final_dir), None)
    assert start.base == str(world["model_dir"]) and start.merge == [sft_stage.final_dir.resolve()]


def test_config_errors_are_for_people(world, tmp_path):
    from lmpipeline.errors import UserError

    with pytest.raises(UserError, match="needs a reference"):
        DPOStage(make_cfg(world, tmp_path / "a", reference="none")).execute(model_name_or_path=str(world["model_dir"]))
    with pytest.raises(UserError, match="adapter_disabled needs LoRA"):
        DPOStage(make_cfg(world, tmp_path / "b", reference="adapter_disabled", use_lora=False)).execute(
            model_name_or_path=str(world["model_dir"]))
    with pytest.raises(UserError, match="no meaning"):
        DPOStage(make_cfg(world, tmp_path / "c", loss_type="hinge", label_smoothing=0.1)).execute(
            model_name_or_path=str(world["model_dir"]))


# ------------------------------------------------------------------------------ packed (varlen)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_packed_layouts_give_the_padded_logps_and_gradients(world, tmp_path, layout):
    """The packed layouts (varlen attention: preference.collate_pairs_packed, and collate_pairs_shared with
    one prompt per pair) score every sequence as the padded layout does: same summed log-probs, lengths
    and gradients, on both log-prob paths."""
    from transformers import AutoModelForCausalLM

    from lmpipeline.data.preference import layout_tokens, pair_collator
    from lmpipeline.models import attention

    cfg = make_cfg(world, tmp_path / "o")
    padded, data, _ = batch_of(world, cfg)
    packed = pair_collator(cfg, None, layout)(data.train[:6])
    assert packed["pairs"] == padded["pairs"] == 6 and packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] == sum(layout_tokens(p, layout) for p in data.train[:6])
    assert len(packed["score_target"]) == int(padded["completion_mask"][:, 1:].sum())
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    weights = torch.linspace(-1, 1, 12)

    def run(fn, batch, **kw):
        model.zero_grad()
        logps, tokens = fn(model, batch, **kw)
        (logps * weights).sum().backward()
        return logps.detach(), tokens, [p.grad.clone() for p in model.parameters()]

    ref = run(lambda m, b, **kw: dpo_mod.completion_logps(m, b["input_ids"], b["attention_mask"], b["completion_mask"],
                                                          **kw), padded, fused=True)
    attention.switch(model, attention.VARLEN)
    for fused in (True, False):
        got = run(dpo_mod.packed_completion_logps, packed, fused=fused)
        assert torch.allclose(got[0], ref[0], atol=1e-4) and torch.equal(got[1], ref[1])
        for a, b in zip(got[2], ref[2]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_dpo_stage_with_varlen_matches_sdpa(world, tmp_path):
    losses = {}
    for attn in ("varlen", "sdpa"):
        stage = DPOStage(make_cfg(world, tmp_path / attn, attn_implementation=attn))
        stage.execute(model_name_or_path=str(world["model_dir"]))
        assert stage.packed == (attn == "varlen")
        losses[attn] = [r["loss"] for r in metrics_lines(tmp_path / attn) if "loss" in r]
    assert len(losses["varlen"]) == 4 and losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-4)


def test_the_stage_says_its_pair_layout_and_when_share_prompt_cannot_apply(world, tmp_path, caplog):
    """varlen (asked for, so the CPU runs it): each pair's prompt once; under SDPA the pairs are padded
    and an explicit share_prompt: true gets a warning naming what it needs."""
    caplog.set_level(logging.INFO, logger="lmpipeline.methods.dpo")
    shared = DPOStage(make_cfg(world, tmp_path / "v", attn_implementation="varlen", max_steps=1))
    shared.execute(model_name_or_path=str(world["model_dir"]))
    assert shared.layout == "shared" and "each pair's prompt once for both replies" in caplog.text
    caplog.clear()
    padded = DPOStage(make_cfg(world, tmp_path / "s", attn_implementation="sdpa", max_steps=1, share_prompt=True))
    padded.execute(model_name_or_path=str(world["model_dir"]))
    assert padded.layout == "padded" and "share_prompt needs varlen attention" in caplog.text


def test_the_python_api_resolves_auto_values_before_training(world, tmp_path, caplog):
    """DPOStage(config).execute without the pipeline: per_device_train_batch_size and torch_compile auto
    become concrete values (here on the CPU: the default micro-batch within the global batch, eager)."""
    caplog.set_level(logging.INFO, logger="lmpipeline.models.speedups")
    stage = DPOStage(make_cfg(world, tmp_path / "auto", per_device_train_batch_size="auto", global_batch_size=8,
                              max_steps=1))
    result = stage.execute(model_name_or_path=str(world["model_dir"]))
    cfg = stage.config
    assert isinstance(cfg.per_device_train_batch_size, int)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 8
    assert cfg.torch_compile is False and "torch_compile (auto): off, no CUDA GPU" in caplog.text
    assert result.global_step == 1


def test_reference_cache_key_follows_the_kernels():
    """An eager run's cached reference must not serve a compiled (or Liger-patched) run: their forwards
    round differently, and policy != reference at step 0 would shift the whole loss curve."""
    cfg = DPOConfig(stage_name="dpo", output_dir="/tmp/unused", dataset_name_or_path="unused.jsonl")
    eager = dpo_mod.reference_settings(cfg, "adapter_disabled", "bfloat16", layout="shared")
    assert eager == dpo_mod.reference_settings(cfg, "adapter_disabled", "bfloat16", layout="shared")
    for change in ({"torch_compile": True}, {"use_liger_kernel": True}, {"bf16": not cfg.bf16}):
        other = dpo_mod.reference_settings(cfg.model_copy(update=change), "adapter_disabled", "bfloat16", layout="shared")
        assert other != eager, change
    for layout in ("packed", "padded"):  # other sums, other rounding
        assert dpo_mod.reference_settings(cfg, "adapter_disabled", "bfloat16", layout=layout) != eager