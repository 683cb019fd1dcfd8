"""The keys and values of the positions a model has already seen, for decoding one token at a time.

Only attention looks back: Memory Layers, norms and the embedding act on each
token alone, so a new token is hashed and looked up by itself and the prefix is
never recomputed. Shapes: B batch, H heads, S positions so far, E head dim.
"""
from __future__ import annotations

import torch


class LayerCache:
    """One block's keys and values so far."""

    def __init__(self):
        self.k_BHSE: torch.Tensor | None = None
        self.v_BHSE: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BHSE is None else self.k_BHSE.shape[-2]

    def extend(self, k_BHSE: torch.Tensor, v_BHSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return all of them."""
        if self.k_BHSE is not None:
            k_BHSE, v_BHSE = torch.cat((self.k_BHSE, k_BHSE), dim=-2), torch.cat((self.v_BHSE, v_BHSE), dim=-2)
        self.k_BHSE, self.v_BHSE = k_BHSE, v_BHSE
        return k_BHSE, v_BHSE


class KVCache:
    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
