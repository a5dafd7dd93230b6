"""Preference losses: one small function per paper, chosen by `loss_type` in a dpo stage's config.

Every function maps the per-pair sequence log-probabilities of a batch (`PairLogps`) to a per-pair
loss tensor of shape (pairs,); the caller sums or averages. All of them follow TRL's DPOTrainer
(trl 1.16, `DPOTrainer._compute_loss`) term for term, except `simpo`, which follows TRL's CPOTrainer
(`trl.experimental.cpo`, `cpo_loss` with loss_type="simpo"); tests/unit/methods/test_losses.py
checks each against a hand-computed value.

Notation (DPO paper): for a prompt x with chosen y_w and rejected y_l,
    h = log pi(y_w|x) - log pi_ref(y_w|x) - (log pi(y_l|x) - log pi_ref(y_l|x))
is the difference of the two log-ratios, each a sum over the completion's tokens.

    sigmoid  DPO, Rafailov et al. 2023 (arXiv:2305.18290), eq. 7:  -log sigmoid(beta * h).
             With label_smoothing = eps > 0: conservative DPO (cDPO, Mitchell 2023, "A note on DPO
             with noisy preferences"): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
             (TRL 1.16's "sigmoid" has no smoothing; eps = 0, the default, is exactly TRL's.)
    ipo      IPO, Azar et al. 2023 (arXiv:2310.12036), eq. 17: (h' - 1/(2 beta))^2, beta = tau.
             h' uses log-ratios averaged over completion tokens (each divided by its length), as
             TRL does ("confirmed with the IPO authors"); the paper writes sequence-level terms.
    hinge    SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425), eq. 1 (the calibration term, without
             its regulariser), on reference-normalised log-ratios as in RSO's "hinge-norm" (Liu et
             al. 2023, arXiv:2309.06657): relu(1 - beta * h). beta is 1/delta, the inverse margin.
    robust   Robust DPO (rDPO), Chowdhury et al. 2024 (arXiv:2403.00409), sec. 3, the de-biased
             loss for a known label-flip rate eps = label_smoothing in [0, 0.5):
             [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).
             An unbiased estimate of the clean DPO loss under flips; eps = 0 is plain DPO.
    simpo    SimPO, Meng et al. 2024 (arXiv:2405.14734), eq. 6: reference-free, length-normalised:
             -log sigmoid(beta * (avg log pi(y_w|x) - avg log pi(y_l|x)) - gamma),
             avg = summed log-prob / completion tokens. gamma is `simpo_gamma` with TRL CPO's
             meaning: the target reward margin itself (CPO computes logits - gamma/beta and
             multiplies by beta, the same thing). The SimPO authors' own code takes a
             gamma/beta ratio instead; theirs `gamma_beta_ratio=0.5, beta=2.0` is
             `simpo_gamma=1.0, beta=2.0` here. label_smoothing applies as in cDPO (as TRL CPO).
             SimPO's paper uses beta around 2-10, not DPO's 0.1.

Rewards for logging (`rewards`): beta * (log pi - log pi_ref) per completion (TRL DPO), and for
simpo, which has no reference, beta * the length-averaged log-prob (TRL CPO).

Raised: ValueError for an unknown loss name, a label_smoothing outside [0, 0.5), label_smoothing
with ipo/hinge (where it has no meaning: never silently ignored), or reference log-probs missing
for a loss that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["PairLogps", "LossParams", "LOSSES", "REFERENCE_FREE", "sigmoid", "ipo", "hinge", "robust", "simpo",
           "preference_loss", "rewards", "check_params"]


@dataclass
class PairLogps:
    """Per-pair log-probabilities, each of shape (pairs,): summed over completion tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    # Completion lengths in tokens (ipo and simpo average over them).
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs and none were given")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("this loss averages over completion tokens and no lengths were given")
        dtype = self.chosen.dtype
        return self.chosen_tokens.clamp(min=1).to(dtype), self.rejected_tokens.clamp(min=1).to(dtype)


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    # Binary cross-entropy against the soft label (1 - eps): cDPO's form.
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(lp: PairLogps, p: LossParams) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7; cDPO label smoothing when p.label_smoothing > 0."""
    chosen, rejected = lp.logratios()
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def ipo(lp: PairLogps, p: LossParams) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17, on token-averaged log-ratios (as TRL)."""
    chosen, rejected = lp.logratios()
    n_chosen, n_rejected = lp.lengths()
    h = chosen / n_chosen - rejected / n_rejected
    return (h - 1 / (2 * p.beta)) ** 2


def hinge(lp: PairLogps, p: LossParams) -> torch.Tensor:
    """SLiC-HF calibration loss, Zhao et al. 2023, eq. 1, on DPO's log-ratios."""
    chosen, rejected = lp.logratios()
    return torch.relu(1 - p.beta * (chosen - rejected))


def robust(lp: PairLogps, p: LossParams) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024, sec. 3: unbiased estimate of the DPO loss under flip rate eps."""
    chosen, rejected = lp.logratios()
    z, eps = p.beta * (chosen - rejected), p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def simpo(lp: PairLogps, p: LossParams) -> torch.Tensor:
    """SimPO, Meng et al. 2024, eq. 6: reference-free, length-normalised, target margin gamma."""
    n_chosen, n_rejected = lp.lengths()
    z = p.beta * (lp.chosen / n_chosen - lp.rejected / n_rejected) - p.simpo_gamma
    return _smoothed_logistic(z, p.label_smoothing)


LOSSES: dict[str, Callable[[PairLogps, LossParams], torch.Tensor]] = {
    "sigmoid": sigmoid,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "simpo": simpo,
}
# Losses that never look at a reference model (no reference forward, no ref log-probs needed).
REFERENCE_FREE = frozenset({"simpo"})
# Losses where label_smoothing means something.
_SMOOTHED = frozenset({"sigmoid", "robust", "simpo"})


def check_params(loss_type: str, p: LossParams) -> None:
    """Reject settings a loss cannot honour (called once, before training)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown preference loss `{loss_type}`; choose from {', '.join(LOSSES)}")
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {p.label_smoothing}")
    if p.label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing has no meaning for loss_type `{loss_type}`; use it with "
                         f"{', '.join(sorted(_SMOOTHED))} or set it to 0")
    if p.beta <= 0:
        raise ValueError(f"beta must be > 0, got {p.beta}")


def rewards(loss_type: str, lp: PairLogps, p: LossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards of chosen and rejected, detached, for logging (see the module docstring)."""
    with torch.no_grad():
        if loss_type in REFERENCE_FREE:
            n_chosen, n_rejected = lp.lengths()
            return p.beta * lp.chosen.detach() / n_chosen, p.beta * lp.rejected.detach() / n_rejected
        chosen, rejected = lp.logratios()
        return p.beta * chosen.detach(), p.beta * rejected.detach()


def preference_loss(loss_type: str, lp: PairLogps, p: LossParams) -> torch.Tensor:
    """Per-pair losses, shape (pairs,), of the loss named `loss_type`."""
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown preference loss `{loss_type}`; choose from {', '.join(LOSSES)}") from None
    return fn(lp, p)
