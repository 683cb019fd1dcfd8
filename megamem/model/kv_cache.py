"""The keys and values of the positions a model has already seen, for decoding one token at a time.

Only attention looks back: Memory Layers, norms and the embedding act on each
token alone, so a new token is hashed and looked up by itself and the prefix is
never recomputed. Shapes: B batch, H heads, S positions so far, E head dim.
"""
from __future__ import annotations

import torch


class LayerCache:
    """One block's keys and values so far, in buffers with room to grow.

    A new position is written into the room left; the buffers double when it
    runs out. Concatenating instead copies the whole cache at every token, which
    was a quarter of MF-tiny's decoding time.
    """

    def __init__(self):
        self.keys_BHCE: torch.Tensor | None = None        # C >= length: the room
        self.values_BHCE: torch.Tensor | None = None
        self.length = 0

    def extend(self, k_BHSE: torch.Tensor, v_BHSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return all of them (views of the buffers)."""
        end = self.length + k_BHSE.shape[-2]
        if self.keys_BHCE is None or end > self.keys_BHCE.shape[-2]:
            self.keys_BHCE, self.values_BHCE = (self._grown(old, new, end) for old, new in
                                                ((self.keys_BHCE, k_BHSE), (self.values_BHCE, v_BHSE)))
        self.keys_BHCE[..., self.length:end, :] = k_BHSE
        self.values_BHCE[..., self.length:end, :] = v_BHSE
        self.length = end
        return self.keys_BHCE[..., :end, :], self.values_BHCE[..., :end, :]

    def _grown(self, old: torch.Tensor | None, new_BHSE: torch.Tensor, end: int) -> torch.Tensor:
        room = max(end, 2 * (0 if old is None else old.shape[-2]), 64)
        grown = new_BHSE.new_empty((*new_BHSE.shape[:-2], room, new_BHSE.shape[-1]))
        if old is not None:
            grown[..., :self.length, :] = old[..., :self.length, :]
        return grown


class KVCache:
    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
