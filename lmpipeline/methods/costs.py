"""What one unit of a method's loss costs, in the terms the estimator's memory and time models count.

A unit is what the method's Objective.count returns (a pair, an unpaired example). Rows are sequences of
about one example's length that go through the model per unit:
    trained_rows     forwards with gradients (activations kept for backward, backward run: ~3x a forward)
    no_grad_rows     forwards of the policy without gradients (no activations kept, ~1x a forward)
    reference_rows   forwards of the reference (no gradients); 0 with precomputed reference log-probs, and
                     for reference-free methods
    lm_head          whether those rows go through the LM head over the vocabulary (log-probs of completion
                     tokens); False for a reward model, whose head is one number per sequence
    reference        whether the method needs a reference model at all
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MethodCost:
    trained_rows: int
    no_grad_rows: int = 0
    reference_rows: int = 0
    lm_head: bool = True
    reference: bool = False

    def forward_equivalents(self, *, precomputed_reference: bool = False) -> float:
        """Forward passes per unit, a trained row counting 3 (forward + backward): the time model's factor."""
        reference = 0 if precomputed_reference else self.reference_rows
        return 3 * self.trained_rows + self.no_grad_rows + reference

    def with_precomputed_reference(self) -> "MethodCost":
        return replace(self, reference_rows=0)


__all__ = ["MethodCost"]
