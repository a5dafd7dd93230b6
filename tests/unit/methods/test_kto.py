"""KTO: the loss against hand-computed values, the unpaired data and its KL rows token by token, parity
with TRL's KTOTrainer on the tiny model, precomputed == on-the-fly references, and learning.

Tolerances: the parity tests compare two float32 computations of the same log-probs (sums over at most
~40 completion tokens of float32 log-softmax values, each off by a few ulp, ~1e-6 relative), so 1e-4 on
the losses and metrics (magnitudes below ~100) leaves an order of magnitude of room; the hand-computed
values are float64 and checked to 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmpipeline.data.types import KTOExample
from lmpipeline.errors import UserError
from lmpipeline.data.unpaired import (
    TokenizedUnpaired,
    build_unpaired_data,
    collate_unpaired,
    make_unpaired_plans,
    rotated_partners,
    tokenize_kto_example,
)
from lmpipeline.methods.dpo import DPOObjective
from lmpipeline.methods.kto import KTOConfig, KTOObjective, derive_metrics, kl_reference_point, kto_loss

from tests.unit.methods.prefs_util import (
    heldout_pair_accuracy,
    lora_on,
    one_thread,  # noqa: F401  (autouse fixture)
    reset_accelerate,
    train_briefly,
)

# ------------------------------------------------------------------------------------------ loss

def test_kto_loss_is_eq7_by_hand():
    # beta 0.5, z0 = 0.4: desirable r=1.2 -> 1 - sigmoid(0.4); undesirable r=-0.6 -> 1 - sigmoid(0.5)
    r = torch.tensor([1.2, -0.6], dtype=torch.float64)
    label = torch.tensor([True, False])
    z0 = torch.tensor(0.4, dtype=torch.float64)
    out = kto_loss(r, label, z0, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    expected = [2.0 * (1 - 1 / (1 + math.exp(-0.4))), 0.5 * (1 - 1 / (1 + math.exp(-0.5)))]
    assert out.tolist() == pytest.approx(expected, abs=1e-9)


def test_reference_point_is_the_clamped_mean_without_gradient():
    logps = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -5.5], dtype=torch.float64)
    z0 = kl_reference_point(logps, ref)
    assert z0.item() == pytest.approx(0.75, abs=1e-12) and not z0.requires_grad
    assert kl_reference_point(ref, logps.detach()).item() == 0.0  # a negative mean clamps to 0


def test_derive_metrics_turns_sums_into_class_means():
    # The loop divides each sum by the units (here 4): the ratios are those of the raw sums.
    record = {"rewards/chosen_sum": 3.0 / 4, "count/chosen": 2 / 4, "rewards/rejected_sum": -1.0 / 4,
              "count/rejected": 2 / 4, "logps/chosen_sum": -20 / 4, "logps/rejected_sum": -30 / 4}
    out = derive_metrics(record)
    assert out["rewards/chosen"] == pytest.approx(1.5) and out["rewards/rejected"] == pytest.approx(-0.5)
    assert out["rewards/margins"] == pytest.approx(2.0) and out["logps/rejected"] == pytest.approx(-15)
    assert "rewards/chosen" not in derive_metrics({"count/chosen": 0.0, "rewards/chosen_sum": 0.0})


def test_config_refuses_a_batch_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        KTOConfig(per_device_train_batch_size=1)


# ------------------------------------------------------------------------------------------ data

def _items():
    return [TokenizedUnpaired([1, 2], [3], True), TokenizedUnpaired([4], [5, 6], False),
            TokenizedUnpaired([7, 8, 9], [10], True)]


def test_kl_rows_pair_each_prompt_with_the_previous_completion():
    items = _items()
    assert rotated_partners(3) == [2, 0, 1]
    batch = collate_unpaired(items, pad_token_id=0)
    for r, e in enumerate(items):
        kl_row = batch["input_ids"][3 + r][batch["attention_mask"][3 + r].bool()].tolist()
        assert kl_row == e.prompt_ids + items[(r - 1) % 3].completion_ids


def test_collated_rows_token_by_token():
    batch = collate_unpaired(_items(), pad_token_id=99)
    ids, att, comp = (batch[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
    assert ids == [[1, 2, 3, 99, 99], [4, 5, 6, 99, 99], [7, 8, 9, 10, 99],
                   [1, 2, 10, 99, 99], [4, 3, 99, 99, 99], [7, 8, 9, 5, 6]]
    assert att == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                   [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert comp == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0],
                    [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["label"].tolist() == [True, False, True] and batch["examples"] == 3


def _cfg(tmp_path, data, **kw):
    base = dict(stage_name="kto", output_dir=str(tmp_path / "out"), dataset_name_or_path=str(data),
                max_seq_length=128, per_device_train_batch_size=6, per_device_eval_batch_size=20,
                save_strategy="no", lr_scheduler_type="constant", logging_steps=10)
    base.update(kw)
    return KTOConfig(**base)


def test_pairs_become_desirable_then_undesirable_examples(tiny_model, quickstart_data, tmp_path):
    from transformers import AutoTokenizer

    from lmpipeline.config.schema import DPOConfig
    from lmpipeline.data.preference import build_preference_data

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(tmp_path, quickstart_data / "dpo_train.jsonl", max_samples=10)
    data = build_unpaired_data(cfg, tok)
    pairs = build_preference_data(DPOConfig(**cfg.model_dump(include={"stage_name", "output_dir",
                                                                         "dataset_name_or_path", "max_seq_length",
                                                                         "max_samples"})), tok).train
    assert [e.label for e in data.train] == [True] * 10 + [False] * 10
    assert [(e.prompt_ids, e.completion_ids) for e in data.train] == (
        [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs])
    assert build_unpaired_data(cfg, tok).cache_hit


def test_shipped_kto_file_with_the_qwen_template(shared_data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-0.5b-instruct")
    data = build_unpaired_data(_cfg(tmp_path, shared_data / "kto" / "llamafactory_kto_en_demo.json",
                                    max_seq_length=8192), tok)
    assert len(data.train) == data.report.total_rows == 300 and data.report.truncated == 0
    labels = {e.label for e in data.train}
    assert labels == {True, False}
    for e in data.train:
        assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n")
        assert tok.convert_ids_to_tokens(e.completion_ids)[-1] == "<|im_end|>"


def test_a_kto_row_tokenises_to_the_rendered_prompt_and_completion(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = KTOExample([{"role": "user", "content": "Add 2 and 3."}], [{"role": "assistant", "content": "5"}], False)
    item = tokenize_kto_example(ex, tok, tok.chat_template)
    assert tok.decode(item.prompt_ids) == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(item.completion_ids) == "5<|im_end|>" and item.label is False


def test_precomputed_plans_fix_each_kl_partner_in_data_order(tiny_model, quickstart_data, tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(tmp_path, quickstart_data / "dpo_train.jsonl", max_samples=8, per_device_train_batch_size=4)
    data = build_unpaired_data(cfg, tok)
    ref = np.arange(2 * len(data.train), dtype=np.float64).reshape(-1, 2)
    plan, _ = make_unpaired_plans(cfg, data, tok, ref_train=ref)
    idx = plan.epoch_batches(0)[0]
    batch = plan.collate(idx)
    n = len(idx)
    for r, i in enumerate(idx):
        e, partner = data.train[i], data.train[(i - 1) % len(data.train)]
        row = batch["input_ids"][n + r][batch["attention_mask"][n + r].bool()].tolist()
        assert row == e.prompt_ids + partner.completion_ids
    assert batch["ref_logps"].tolist() == ref[idx, 0].tolist()
    assert batch["ref_kl_logps"].tolist() == ref[idx, 1].tolist()


# ------------------------------------------------------------------------------- TRL parity

TRL_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _parity_batch(tiny_model, quickstart_data, tmp_path, n=6):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(tmp_path, quickstart_data / "dpo_train.jsonl", max_samples=n)
    data = build_unpaired_data(cfg, tok)
    # Desirable and undesirable examples of different prompts mixed in one micro-batch.
    items = [data.train[i] for i in (0, n + 1, 2, n + 3, 4, n + 5)]
    return collate_unpaired(items, tok.pad_token_id), tok


def _trl_trainer(tiny_model, tmp_path, model, tok, ref_model=None, peft_config=None):
    from datasets import Dataset
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "a"}],
             "label": bool(i % 2)} for i in range(4)]
    args = TRLKTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.1, max_length=None,
                        per_device_train_batch_size=2, use_cpu=True, bf16=False, disable_dropout=True,
                        save_strategy="no", logging_strategy="no", desirable_weight=1.3, undesirable_weight=0.7)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=peft_config)


def _compare(trainer, objective, batch):
    trl_batch = {"input_ids": batch["input_ids"][:6], "attention_mask": batch["attention_mask"][:6],
                 "completion_mask": batch["completion_mask"][:6], "KL_input_ids": batch["input_ids"][6:],
                 "KL_attention_mask": batch["attention_mask"][6:], "KL_completion_mask": batch["completion_mask"][6:],
                 "label": batch["label"]}
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
        ours, m = objective.loss(trainer.model, batch, total_units=objective.count(batch))
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    units = m.pop("units")
    ours_metrics = derive_metrics({k: float(v) / units for k, v in m.items()})
    diffs = {"loss": abs(ours.item() - trl_loss.item())}
    diffs.update({k: abs(ours_metrics[k] - trl[k]) for k in TRL_METRICS})
    assert trl["kl"] > 0, "a zero reference point would not test the KL rows"
    return diffs


@pytest.mark.integration
@pytest.mark.parametrize("reference", ["adapter_disabled", "frozen_copy"], ids=["lora", "full"])
def test_matches_trl_kto_trainer(tiny_model, quickstart_data, tmp_path, reference):
    pytest.importorskip("trl")
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    batch, tok = _parity_batch(tiny_model, quickstart_data, tmp_path)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    if reference == "adapter_disabled":
        trainer = _trl_trainer(tiny_model, tmp_path, policy, tok,
                               peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        lora_on(trainer.model, seed=0)  # a seed whose mismatched rows give z0 > 0 (not clamped)
        objective = KTOObjective(0.1, 1.3, 0.7, reference=reference)
    else:
        torch.manual_seed(0)  # a seed whose mismatched rows give z0 > 0 (not clamped)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        trainer = _trl_trainer(tiny_model, tmp_path, policy, tok, ref_model=AutoModelForCausalLM.from_pretrained(tiny_model))
        objective = KTOObjective(0.1, 1.3, 0.7, reference=reference, ref_model=trainer.ref_model)
    try:
        diffs = _compare(trainer, objective, batch)
        assert max(diffs.values()) < 1e-4, diffs
    finally:
        reset_accelerate()


@pytest.mark.integration
def test_precomputed_reference_equals_the_on_the_fly_one(tiny_model, quickstart_data, tmp_path):
    from transformers import AutoModelForCausalLM

    batch, _ = _parity_batch(tiny_model, quickstart_data, tmp_path)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    lora_on(model)
    live = KTOObjective(reference="adapter_disabled")
    with torch.no_grad():
        ref, ref_kl = live.reference_logps(model, batch)
        loss, m = live.loss(model, batch, 6)
        stored = dict(batch, ref_logps=ref, ref_kl_logps=ref_kl)
        loss2, m2 = KTOObjective(reference="precomputed").loss(model, stored, 6)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)
    assert float(m2["kl"]) == pytest.approx(float(m["kl"]), abs=1e-6)


# ---------------------------------------------------------------------------------- learning

@pytest.mark.integration
def test_kto_on_quickstart_raises_heldout_reward_accuracy(tiny_model, quickstart_data, tmp_path):
    # A rate that decays: at a constant 2e-3 the undesirable examples drag every log-prob down and both
    # classes saturate (z0 clamps at 0); decaying from 1e-3 learns the contrast.
    cfg = _cfg(tmp_path, quickstart_data / "dpo_train.jsonl", max_samples=200, max_steps=150, learning_rate=1e-3,
               beta=0.5, per_device_train_batch_size=16, lr_scheduler_type="linear", logging_steps=50)
    model, tok, before, after = train_briefly(
        tiny_model, quickstart_data, cfg, build=build_unpaired_data, plans=make_unpaired_plans,
        objective=KTOObjective.from_config(cfg, reference="adapter_disabled"))
    # The implicit reward beta * (log pi - log pi_ref) of each held-out pair's replies, as DPO reads it.
    accuracy = heldout_pair_accuracy(model, tok, quickstart_data, tmp_path / "pairs",
                                     DPOObjective(beta=0.5, reference="adapter_disabled"))
    assert accuracy > 0.6, (accuracy, before, after)


def test_stage_refuses_a_micro_batch_of_one_after_auto_fit(tmp_path):
    """Auto-fit may choose 1 after the config's own check saw `auto`: the recipe refuses it with the key."""
    from lmpipeline.methods.kto import KTORecipe

    cfg = KTOConfig(stage_name="kto", output_dir=str(tmp_path), dataset_name_or_path="x.jsonl",
                    per_device_train_batch_size="auto").model_copy(update={"per_device_train_batch_size": 1})
    recipe = KTORecipe(cfg, "base", None, has_model=False)
    with pytest.raises(UserError) as err:
        recipe.build_data(tokenizer=None)
    assert err.value.key == "stage_configs.kto.per_device_train_batch_size"
