"""Linear layers. A merged layer (QKV, gate/up) loads each part into its rows of one weight.

A projection may take the RMSNorm before it, silu_and_mul of its merged [gate | up] output and a
residual to add: at decode on the GPU they run inside one Triton GEMV; elsewhere they are the
separate norm and activation kernels, the matmul and an add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.kernels import on_gpu, triton_module
from tuili.layers.activation import silu_and_mul
from tuili.layers.int4 import Int4Weight, int4_linear, pack
from tuili.layers.norm import RMSNorm

# SmolLM2's whole decode graph on an H100: 938 / 939 / 936 / 934 us at batch 1 / 2 / 4 / 8 unfused,
# 720 / 774 / 889 / 886 us fused (benchmarks/gpu_decode_graph.py).
GEMV_MAX_ROWS = 8


def fuses_into_gemv(x: torch.Tensor) -> bool:
    """A decode-sized step on the GPU (<= GEMV_MAX_ROWS rows of 16-bit floats): each norm, SiLU and
    residual add rides in a projection's GEMV as its prologue or epilogue, not a kernel of its own."""
    return (on_gpu(x) and x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16))


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). One row of 16-bit floats on CPU goes through matrix-vector: oneDNN's
    bf16 GEMM is about half as fast as its GEMV at batch 1, and decode at batch 1 is all GEMV."""
    if x.shape[0] == 1 and x.dim() == 2 and weight.dtype != torch.float32 and not x.is_cuda:
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm: RMSNorm | None = None, norm_sumsq: torch.Tensor | None = None,
           gated: bool = False, residual: torch.Tensor | None = None, want_sumsq: bool = False):
    """norm(x) (x if no norm) @ weight.T (+ bias), then silu(gate) * up if gated (weight is a
    merged [gate | up]), then + residual.

    At decode the GEMV that adds a residual can also leave the new stream's sum of squares per row
    (want_sumsq: returns (out, sums), sums None where no GEMV ran); given to the next projection as
    norm_sumsq, they spare its norm prologue a pass over x in every program."""
    if fuses_into_gemv(x):
        gemv = triton_module("triton_gemv")
        n = weight.shape[0] // 2 if gated else weight.shape[0]
        norm_pass = norm is not None and norm_sumsq is None
        config = gemv.default_config(x.shape[0], n, weight.shape[1], norm_pass, gated)
        if config is not None:
            return gemv.gemv(x, weight, bias, residual, norm.weight if norm is not None else None,
                             norm.eps if norm is not None else 0.0, gated, config,
                             sumsq=norm_sumsq if norm is not None else None, want_sumsq=want_sumsq)
    out = epilogue(matmul(x if norm is None else norm(x), weight, bias), gated, residual)
    return (out, None) if want_sumsq else out


def epilogue(out: torch.Tensor, gated: bool, residual: torch.Tensor | None) -> torch.Tensor:
    out = silu_and_mul(out) if gated else out
    return out if residual is None else out + residual


class Linear(nn.Module):
    """y = x W^T (+ b). When every part arrives as Int4Weight the layer also keeps W packed in 4 bits:
    torch's int4 CPU kernel reads a quarter of the bytes but does not reuse them across rows, so it
    serves up to INT4_MAX_ROWS rows (decode) and the float weight serves the rest (prefill, batches)."""

    INT4_MAX_ROWS = 4

    def __init__(self, in_features: int, out_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        out = sum(self.out_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self._int4_parts: dict[int, Int4Weight] = {}
        self.packed: torch.Tensor | None = None  # int4 weight, when packed
        self.scales_zeros: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *, norm: RMSNorm | None = None,
                norm_sumsq: torch.Tensor | None = None, gated: bool = False,
                residual: torch.Tensor | None = None, want_sumsq: bool = False):
        """norm(x) W^T (+ b), silu-and-mul'ed if gated, + residual: as `linear`."""
        if self.packed is not None and x.shape[0] <= self.INT4_MAX_ROWS:
            out = int4_linear(x if norm is None else norm(x), self.packed, self.scales_zeros)
            out = epilogue(out if self.bias is None else out + self.bias, gated, residual)
            return (out, None) if want_sumsq else out
        return linear(x, self.weight, self.bias, norm=norm, norm_sumsq=norm_sumsq, gated=gated,
                      residual=residual, want_sumsq=want_sumsq)

    def load(self, name: str, tensor: torch.Tensor | Int4Weight, part: int = 0) -> None:
        """Copy a checkpoint tensor ("weight" or "bias") into output part `part`."""
        target = self.weight if name == "weight" else self.bias
        rows = self.out_sizes[part]
        if tensor.shape[0] != rows or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"shape {tuple(tensor.shape)} does not fit part {part} of a layer "
                f"{tuple(target.shape)} split {self.out_sizes}"
            )
        if isinstance(tensor, Int4Weight):
            self._int4_parts[part] = tensor
            return
        start = sum(self.out_sizes[:part])
        target.data[start:start + rows].copy_(tensor)

    def finalize(self) -> None:
        """After loading: pack the 4-bit parts if all parts are 4-bit, else dequantize them."""
        parts = self._int4_parts
        self._int4_parts = {}
        if parts and len(parts) == len(self.out_sizes):
            self.packed, self.scales_zeros = pack(Int4Weight.cat([parts[i] for i in sorted(parts)]))
        for part, w in parts.items():
            start = sum(self.out_sizes[:part])
            self.weight.data[start:start + self.out_sizes[part]].copy_(w.dequantize())

    def _apply(self, fn, recurse=True):
        # Packed int4 tensors are bytes, not floats: keep them out of .to(dtype).
        packed, sz = self.packed, self.scales_zeros
        self.packed = self.scales_zeros = None
        result = super()._apply(fn, recurse)
        self.packed, self.scales_zeros = packed, sz
        return result
