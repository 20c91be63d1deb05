"""Linear layers. A merged layer (QKV, gate/up) loads each part into its rows of one weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). One row of 16-bit floats on CPU goes through matrix-vector: oneDNN's
    bf16 GEMM is about half as fast as its GEMV at batch 1, and decode at batch 1 is all GEMV."""
    if x.shape[0] == 1 and x.dim() == 2 and weight.dtype != torch.float32 and not x.is_cuda:
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        out = sum(self.out_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

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
