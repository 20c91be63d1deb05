"""Linear layers. A merged layer (QKV, gate/up) loads each part into its rows of one weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        out = sum(self.out_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, tensor: torch.Tensor, part: int = 0) -> None:
        """Copy a checkpoint tensor ("weight" or "bias") into output part `part`."""
        target = self.weight if name == "weight" else self.bias
        start = sum(self.out_sizes[:part])
        rows = self.out_sizes[part]
        if tensor.shape[0] != rows or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"shape {tuple(tensor.shape)} does not fit part {part} of a layer "
                f"{tuple(target.shape)} split {self.out_sizes}"
            )
        target.data[start:start + rows].copy_(tensor)
