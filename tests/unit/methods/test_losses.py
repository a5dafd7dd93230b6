"""Each preference loss against a value computed by hand, plus SimPO against TRL's CPO implementation.

Shared numbers (beta = 0.5 unless said otherwise):
    policy logps: chosen -10 (4 tokens), rejected -12 (2 tokens); reference: -11 and -11
    log-ratios: chosen +1, rejected -1, so h = 2 and beta * h = 1
"""

import math
from types import SimpleNamespace

import pytest
import torch

from lmpipeline.methods import losses
from lmpipeline.methods.losses import LossParams, PairLogps


def _lp(with_ref: bool = True) -> PairLogps:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(-10.0), t(-12.0), t(-11.0) if with_ref else None, t(-11.0) if with_ref else None,
                     torch.tensor([4]), torch.tensor([2]))


# -log sigmoid(1) = log(1 + e^-1) and -log sigmoid(-1) = log(1 + e) to 10 digits.
NLS_1 = 0.3132616875
NLS_M1 = 1.3132616875


def test_sigmoid_is_dpo_eq7():
    assert losses.sigmoid(_lp(), LossParams(beta=0.5)).item() == pytest.approx(NLS_1, abs=1e-9)


def test_sigmoid_label_smoothing_is_cdpo():
    # 0.9 * 0.3132616875 + 0.1 * 1.3132616875
    value = losses.sigmoid(_lp(), LossParams(beta=0.5, label_smoothing=0.1)).item()
    assert value == pytest.approx(0.4132616875, abs=1e-9)


def test_robust():
    # (0.9 * 0.3132616875 - 0.1 * 1.3132616875) / 0.8 = 0.15060935 / 0.8
    value = losses.robust(_lp(), LossParams(beta=0.5, label_smoothing=0.1)).item()
    assert value == pytest.approx(0.1882616875, abs=1e-9)
    # eps = 0 is plain DPO
    assert losses.robust(_lp(), LossParams(beta=0.5)).item() == pytest.approx(NLS_1, abs=1e-9)


def test_hinge():
    # relu(1 - 0.25 * 2) = 0.5 ; relu(1 - 0.5 * 2) = 0
    assert losses.hinge(_lp(), LossParams(beta=0.25)).item() == pytest.approx(0.5)
    assert losses.hinge(_lp(), LossParams(beta=0.5)).item() == 0.0


def test_ipo_uses_token_averaged_logratios():
    # h' = 1/4 - (-1)/2 = 0.75 ; 1/(2 beta) = 1 ; (0.75 - 1)^2 = 0.0625
    assert losses.ipo(_lp(), LossParams(beta=0.5)).item() == pytest.approx(0.0625)


def test_simpo_is_reference_free_and_length_normalised():
    # avg chosen -10/4 = -2.5, avg rejected -12/2 = -6 ; z = 2 * 3.5 - 0.5 = 6.5 ; log(1 + e^-6.5)
    value = losses.simpo(_lp(with_ref=False), LossParams(beta=2.0, simpo_gamma=0.5)).item()
    assert value == pytest.approx(0.0015023102, abs=1e-9)  # ten decimals: the constant rounds by <= 5e-11
    assert "simpo" in losses.REFERENCE_FREE


def test_rewards():
    chosen, rejected = losses.rewards("sigmoid", _lp(), LossParams(beta=0.5))
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)  # beta * log-ratio
    chosen, rejected = losses.rewards("simpo", _lp(with_ref=False), LossParams(beta=2.0))
    assert (chosen.item(), rejected.item()) == (-5.0, -12.0)  # beta * average log-prob


def test_step0_equal_policy_and_reference_is_ln2():
    lp = PairLogps(torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-3.0, -7.0]),
                   torch.tensor([-5.0, -1.0]))
    assert torch.allclose(losses.sigmoid(lp, LossParams()), torch.full((2,), math.log(2)))


def test_every_loss_is_selectable_by_its_config_name():
    from typing import get_args

    from lmpipeline.config.schema import DPOConfig

    assert set(get_args(DPOConfig.model_fields["loss_type"].annotation)) == set(losses.LOSSES)
    for name in losses.LOSSES:
        lp = _lp(with_ref=name not in losses.REFERENCE_FREE)
        assert losses.preference_loss(name, lp, LossParams(beta=0.5)).shape == (1,)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown preference loss"):
        losses.check_params("kto", LossParams())
    with pytest.raises(ValueError, match="no meaning"):
        losses.check_params("ipo", LossParams(label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        losses.check_params("robust", LossParams(label_smoothing=0.5))
    with pytest.raises(ValueError, match="reference"):
        losses.sigmoid(_lp(with_ref=False), LossParams())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(5) * 20, -torch.rand(5) * 20
    n_chosen, n_rejected = torch.randint(1, 9, (5,)), torch.randint(1, 9, (5,))
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=smoothing,
                           accelerator=SimpleNamespace(device="cpu"))
    # CPO takes length-averaged log-probs (get_batch_logps(average_log_prob=True) for simpo).
    ref_losses, ref_chosen_r, ref_rejected_r = cpo.CPOTrainer.cpo_loss(fake, chosen / n_chosen, rejected / n_rejected)
    lp = PairLogps(chosen, rejected, chosen_tokens=n_chosen, rejected_tokens=n_rejected)
    p = LossParams(beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    assert torch.allclose(losses.simpo(lp, p), ref_losses, atol=1e-6)
    ours_c, ours_r = losses.rewards("simpo", lp, p)
    assert torch.allclose(ours_c, ref_chosen_r, atol=1e-6) and torch.allclose(ours_r, ref_rejected_r, atol=1e-6)
