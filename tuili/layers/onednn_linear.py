"""Dense linears on the CPU through oneDNN, their weights reordered once into its blocked layout
(torch.ops.mkldnn, as torch.compile's CPU freezing uses): at the row counts of an encoder's step
(16 to 2000 tokens) ~2x float32's F.linear and 1.2-1.5x bfloat16's on the dev VM (AVX-512, AMX;
1 thread, CPU time), with GELU or ReLU fused. `pack` gives None where this torch build, this CPU
or this dtype has no such path; callers then keep F.linear."""

from __future__ import annotations

import torch
from torch import nn

# activation name -> (oneDNN post-op, its algorithm)
ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
               "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
_NONE = ("none", "")


class OneDNNLinear:
    """x @ W.T + b (then the activation) with W in oneDNN's layout; x [rows, in] on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        self.bias = None if bias is None else bias.detach()
        self.post_op, self.algorithm = ACTIVATIONS[activation] if activation else _NONE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post_op, [],
                                                  self.algorithm)


def pack(linear: nn.Linear, activation: str | None = None) -> OneDNNLinear | None:
    """`linear` (and `activation` after it) through oneDNN, or None where that cannot run."""
    w = linear.weight
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if w.dtype not in (torch.float32, torch.bfloat16) or \
            (activation is not None and activation not in ACTIVATIONS):
        return None
    try:
        packed = OneDNNLinear(w, linear.bias, activation)
        packed(torch.zeros(1, w.shape[1], dtype=w.dtype))  # this build runs it
    except (RuntimeError, AttributeError):
        return None
    return packed
