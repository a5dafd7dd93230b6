"""A batch plan: which examples form each micro-batch of an epoch, and how indices become tensors.

The data layer builds one per stage (data/build.py for SFT rows, data/preference.py for pairs); the
training loop reads it through its `MicroBatches` protocol. The order is a pure function of the seed
and the epoch, so a resumed run sees exactly the micro-batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BatchPlan:
    """Micro-batches of example indices for each epoch, and how to turn indices into tensors."""

    epoch_batches: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], dict]
    describe: Callable[[list[int]], list[str]] = lambda idx: [str(i) for i in idx]
    # micro_batch_tokens: regroup(a step's micro-batches, world=...) -> the same rows in fewer, token-bounded ones
    regroup: Callable[..., list[list[int]]] | None = None
    # The last epoch's micro-batches: epoch_batches shuffles the whole dataset, once per epoch is enough.
    _epoch: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False)

    def step_batches(self, epoch: int, pos: int, per_step: int, world: int = 1) -> list[list[int]]:
        """The micro-batches of optimizer step `pos` of `epoch` (all ranks; rank r trains r, r + world, ...)."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        micro = self._epoch[1][pos * per_step:(pos + 1) * per_step]
        return self.regroup(micro, world=world) if self.regroup is not None else micro
