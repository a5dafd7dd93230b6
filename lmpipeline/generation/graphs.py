"""The decode step captured as CUDA graphs, one per slot-count bucket.

A step launches a few hundred small kernels; replaying them as one graph removes the host from the
pace (the reason transformers' dynamic-cache decoding runs at a few percent of the GPU). Each bucket
b captures SlotState.step over slots 0 .. b-1 against the engine's cache and state tensors, whose
addresses never change, so a replay reads the current tokens and positions and writes the results in
place. Buckets are powers of two up to the slot count (and the slot count itself); a step over
fewer active slots runs the smallest bucket that covers the highest active slot. All buckets share
one memory pool, captured largest first (the smaller ones reuse its blocks).
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def buckets(slots: int) -> list[int]:
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def bucket_for(active_top: int, available: list[int]) -> int:
    """The smallest bucket covering slots 0 .. active_top - 1."""
    return next(b for b in available if b >= active_top)


class DecodeGraphs:
    def __init__(self, step, slots: int, mode: str):
        """`step(b, mode)`: the eager step to capture (SlotState.step bound to the runner and cache)."""
        self.step, self.mode = step, mode
        self.sizes = buckets(slots)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0

    def capture(self) -> None:
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # warm-up: lazy kernel choices and workspace before capture
                self.step(b, self.mode)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for b in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.step(b, self.mode)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("generation: decode step captured for %d slot bucket(s) %s in %.1fs (%s)", len(self.sizes),
                 self.sizes, self.capture_seconds, self.mode)

    def replay(self, b: int) -> None:
        self.graphs[b].replay()
