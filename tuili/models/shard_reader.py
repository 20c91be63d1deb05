"""A safetensors tensor not read yet: a tensor-parallel rank reads only its rows or columns."""

from __future__ import annotations

import torch

FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_loaded(tensor: torch.Tensor) -> torch.Tensor:
    """Float weights in float32 (cast to the model's dtype as they are copied in); packed
    integers and FP8 stay as stored: their methods unpack them."""
    return tensor.float() if tensor.dtype in FLOAT_WEIGHTS else tensor


class TensorSlice:
    """One checkpoint tensor behind safetensors' get_slice, with torch's `shape` and `narrow`;
    the file must stay open while it is used (loader._safetensors_weights yields it so)."""

    def __init__(self, lazy):
        self._lazy = lazy
        self.shape = torch.Size(lazy.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return as_loaded(self._lazy[index])

    def materialize(self) -> torch.Tensor:
        return as_loaded(self._lazy[:]) if self.shape else as_loaded(self._lazy.get_tensor())
