"""RMSNorm, optionally fused with the residual add that precedes it; its kernels are its backend's."""

from __future__ import annotations

import torch
from torch import nn

from tuili.layers.backend import TORCH, Backend


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: Backend = TORCH):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rmsnorm(x) or, given a residual, (rmsnorm(x + residual), x + residual)."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps)
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)
