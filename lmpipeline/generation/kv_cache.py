"""A static, preallocated KV cache: [layers, slots, max_len, kv_heads, head_dim] for keys and values.

Allocated once for a request set (the slot count and the longest prompt plus its new tokens) and
written in place, so the tensors a captured decode step reads and writes never move. A slot holds
one sequence; what lies beyond its current length is stale and never attended to (the decode step
masks by length), so a refilled slot needs no clearing.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def fits(self, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.slots >= slots and self.max_len >= max_len and self.k.dtype == dtype
                and self.k.device == device)

    def write_prefix(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0 .. S-1 of `slots` [P] from k, v [P, S, kv_heads, head_dim] (a prefill)."""
        n = k.shape[1]
        self.k[layer, slots, :n] = k
        self.v[layer, slots, :n] = v

    def write_step(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """One position per slot (a decode step): k, v [B, kv_heads, head_dim] at `positions` [B]."""
        self.k[layer].index_put_((slots, positions), k)
        self.v[layer].index_put_((slots, positions), v)

    def layer_view(self, layer: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `slots` slots as [slots, kv_heads, max_len, head_dim] views."""
        return self.k[layer, :slots].transpose(1, 2), self.v[layer, :slots].transpose(1, 2)

    def copy_prefix(self, src: int, dsts: list[int], length: int) -> None:
        """Share one prefill among the samples of a prompt: slot `src`'s first `length` positions."""
        if dsts:
            idx = torch.tensor(dsts, device=self.k.device)
            self.k[:, idx, :length] = self.k[:, src:src + 1, :length]
            self.v[:, idx, :length] = self.v[:, src:src + 1, :length]
