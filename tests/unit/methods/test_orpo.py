"""ORPO: the odds-ratio loss against hand-computed values, parity with TRL's ORPOTrainer on the tiny model,
what `nll_on_prompt` changes, and learning on the quickstart pairs.

Tolerances: hand-computed values are float64, checked to 1e-9. The parity tests compare float32
log-prob sums over at most ~40 tokens (a few ulp each, ~1e-6 relative) and token-mean NLLs over a few
hundred tokens: 1e-4 on values below ~50 leaves an order of magnitude of room.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmpipeline.data.preference import collate_pairs, make_pair_plans, build_preference_data
from lmpipeline.methods.orpo import (
    ORPOConfig,
    ORPOObjective,
    log1mexp,
    log_odds_ratio,
    odds_ratio_loss,
    orpo_loss,
)

from tests.unit.methods.prefs_util import (
    heldout_pair_accuracy,
    one_thread,  # noqa: F401  (autouse fixture)
    quickstart_pairs,
    reset_accelerate,
    tiny_lora,
    train_briefly,
)


def test_log1mexp_is_log_one_minus_p_on_both_branches():
    x = torch.tensor([-1e-8, -0.5, -0.7, -3.0, -40.0], dtype=torch.float64)
    expected = [math.log(1 - math.exp(v)) if v > -30 else -math.exp(v) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-9)


def test_odds_ratio_loss_is_eq7_by_hand():
    # average log-probs: chosen log 0.5, rejected log 0.2 -> odds 1 and 0.25 -> log odds ratio log 4
    chosen = torch.tensor([math.log(0.5)], dtype=torch.float64)
    rejected = torch.tensor([math.log(0.2)], dtype=torch.float64)
    assert log_odds_ratio(chosen.float(), rejected.float()).item() == pytest.approx(math.log(4), abs=1e-6)
    assert odds_ratio_loss(chosen, rejected).dtype == torch.float32  # TRL's float32 upcast
    expected = -math.log(1 / (1 + 1 / 4))  # -log sigmoid(log 4) = log(1 + 1/4)
    assert odds_ratio_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    # eq. 6: NLL + lambda * mean L_OR
    assert orpo_loss(torch.tensor(2.0), chosen, rejected, beta=0.5).item() == pytest.approx(2 + 0.5 * expected, abs=1e-6)


# ------------------------------------------------------------------------------- TRL parity

TRL_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
               "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _trl_batch(batch):
    n = batch["pairs"]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = labels[rows]
    return out


@pytest.fixture
def trl_orpo(tiny_model, quickstart_data, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the pretrained point, so that the replies' odds differ clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]} for i in range(2)]
    args = TRLORPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.25, max_length=256,
                         per_device_train_batch_size=2, use_cpu=True, bf16=False, gradient_checkpointing=False,
                         save_strategy="no", logging_strategy="no")
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    pairs = quickstart_pairs(tok, quickstart_data, tmp_path / "pairs", split="train", n=6)
    yield trainer, collate_pairs(pairs, tok.pad_token_id)
    reset_accelerate()


def _ours(trainer, batch, nll_on_prompt):
    objective = ORPOObjective(beta=0.25, nll_on_prompt=nll_on_prompt)
    with torch.no_grad():
        loss, m = objective.loss(trainer.model, batch, total_units=objective.count(batch))
    units = m.pop("units")
    return loss.item(), {k: float(v) / units for k, v in m.items()}


def _theirs(trainer, batch):
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _trl_batch(batch), train_eval="train")
    return loss.item(), metrics


@pytest.mark.integration
def test_matches_trl_orpo_trainer_with_nll_on_prompt(trl_orpo):
    trainer, batch = trl_orpo
    ours_loss, ours = _ours(trainer, batch, nll_on_prompt=True)
    trl_loss, trl = _theirs(trainer, batch)
    diffs = {"loss": abs(ours_loss - trl_loss), **{k: abs(ours[k] - trl[k]) for k in TRL_METRICS}}
    assert max(diffs.values()) < 1e-4, diffs
    assert 0 < trl["rewards/accuracies"] < 1, "a batch with both orders of the odds tests the accuracy"


@pytest.mark.integration
def test_default_nll_counts_the_reply_only_and_changes_nothing_else(trl_orpo):
    trainer, batch = trl_orpo
    ours_loss, ours = _ours(trainer, batch, nll_on_prompt=False)
    _, trl = _theirs(trainer, batch)
    for k in TRL_METRICS:
        if k != "nll_loss":
            assert ours[k] == pytest.approx(trl[k], abs=1e-4), k
    # The reply-only NLL, by hand from the same logits.
    n = batch["pairs"]
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n]).logits
    mask = batch["completion_mask"][:n, 1:].bool()
    token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:n, 1:],
                                                  reduction="none")
    assert ours["nll_loss"] == pytest.approx(token_nll[mask].mean().item(), abs=1e-5)
    assert ours_loss == pytest.approx(ours["nll_loss"] - 0.25 * ours["log_odds_ratio"], abs=1e-5)


# ---------------------------------------------------------------------------------- learning

@pytest.mark.integration
def test_orpo_on_quickstart_raises_heldout_reward_accuracy(tiny_model, quickstart_data, tmp_path):
    from transformers import AutoTokenizer

    cfg = ORPOConfig(stage_name="orpo", output_dir=str(tmp_path / "out"),
                     dataset_name_or_path=str(quickstart_data / "dpo_train.jsonl"), max_samples=1500,
                     max_seq_length=128, max_steps=60, per_device_train_batch_size=8, learning_rate=2e-3, beta=0.5,
                     save_strategy="no", lr_scheduler_type="constant", logging_steps=20)
    objective = ORPOObjective.from_config(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = tiny_lora(tiny_model, cfg)
    before = heldout_pair_accuracy(model, tok, quickstart_data, tmp_path / "pairs", objective)
    model, tok, _, _ = train_briefly(tiny_model, quickstart_data, cfg, build=build_preference_data,
                                     plans=make_pair_plans, objective=objective, model=model)
    after = heldout_pair_accuracy(model, tok, quickstart_data, tmp_path / "pairs", objective)
    assert after > 0.6 and after > before, (before, after)
