"""Linear layers: y = x W^T (+ b), applied by a method chosen at load (one class per weight format).

Each parameter carries its own `weight_loader(param, tensor, part)`: a merged layer (QKV, gate/up)
loads each checkpoint part into its rows, so a column- or row-parallel layer, or a quantized
format, is one new class. Fusions (a norm before, SiLU or a residual add after) are not the
layer's: the model asks its backend for them (`backend.linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.kernels import cpu_vnni
from tuili.layers.int4 import Int4Weight, int4_linear, pack


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). One row of 16-bit floats on CPU goes through matrix-vector: oneDNN's
    bf16 GEMM is about half as fast as its GEMV at batch 1, and decode at batch 1 is all GEMV."""
    if x.shape[0] == 1 and x.dim() == 2 and weight.dtype != torch.float32 and not x.is_cuda:
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, part: int = 0) -> None:
    """A parameter without a weight_loader of its own takes the checkpoint tensor whole."""
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)


class LinearMethod:
    """How a Linear's weight is held and applied. This one: the float weight as it is."""

    name = "none"  # as the engine's `quantization` option names it
    fusable = True  # whether a fused kernel (the decode GEMV) may read layer.weight as it is

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, layer.weight, layer.bias)

    def fused_gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        """A decode GEMV of this format with triton_gemv.gemv's fusions (residual, norm_weight,
        eps, sumsq, gated, want_sumsq), or None where it has none (the backend runs them apart;
        a fusable float weight takes the bf16 GEMV instead)."""
        return None

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Turn the loaded tensors into the form apply reads (quantized methods: quantization/)."""


UNQUANTIZED = LinearMethod()


class Int4CpuMethod(LinearMethod):
    """The weight also kept packed in 4 bits for steps of up to MAX_ROWS rows (decode); the float
    weight serves the rest (prefill, batches), as the 4-bit kernels do not reuse the weights
    across rows. On AVX512-VNNI CPUs the 4-bit GEMV is kernels/cpu_vnni's (activations quantized
    to int8 with a scale per 16, as llama.cpp's Q4_1 x Q8; 2.3-3.4x torch's int4 kernel on
    SmolLM2's shapes, BENCHMARKS.md 2026-12-08), else torch's int4 kernel (bf16 activations)."""

    name = "int4"
    MAX_ROWS = 4
    fusable = False

    def __init__(self, w: Int4Weight):
        self.n, k = w.shape
        self.vnni = cpu_vnni.module() if cpu_vnni.fits(self.n, k) else None
        # The tensors the 4-bit kernel reads (their bytes are what a decode step reads).
        self.tensors = (cpu_vnni.pack_int4(w.q, w.scale, w.zero),) if self.vnni else pack(w)

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x [M <= MAX_ROWS, K] (bf16) @ the 4-bit weight.T, bias-free."""
        if self.vnni is not None:
            return self.vnni.int4_gemv(x.contiguous(), self.tensors[0], self.n)
        return int4_linear(x, *self.tensors)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.MAX_ROWS:
            return matmul(x, layer.weight, layer.bias)
        out = self.gemv(x)
        return out if layer.bias is None else out + layer.bias


class Linear(nn.Module):
    """y = x W^T (+ b) over out_sizes parts stacked in one weight. `weight`: share an existing
    parameter (an LM head tied to the embedding), loaded by its owner."""

    reduces = False  # a row-parallel shard: its output is a partial sum (layers/parallel.py)

    def __init__(self, in_features: int, out_sizes: int | list[int], bias: bool = False,
                 weight: nn.Parameter | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        out = sum(self.out_sizes)
        self.method: LinearMethod = UNQUANTIZED
        if weight is None:
            weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
            weight.weight_loader = self.weight_loader
            weight.num_parts = len(self.out_sizes)
        self.weight = weight
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.num_parts = len(self.out_sizes)
        self._int4_parts: dict[int, Int4Weight] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def shard_of(self, tensor, part: int = 0, out_dim: int | None = 0, out_per: int = 1,
                 in_dim: int | None = 1, in_per: int = 1):
        """This rank's piece of a checkpoint tensor (the whole of it here; layers/parallel.py
        cuts it); quantized methods whose loaders replace weight_loader cut through this, saying
        along which dimension the output and input features lie, and how many an element holds."""
        return tensor

    def row_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """Each output row's largest magnitude (per-channel scales at load): of the whole row,
        also where this layer holds a rank's columns of it."""
        return w.abs().amax(-1)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor | Int4Weight,
                      part: int = 0) -> None:
        """Copy a checkpoint tensor into output part `part` of param (weight or bias)."""
        rows = self.out_sizes[part]
        if tensor.shape[0] != rows or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shape {tuple(tensor.shape)} does not fit part {part} of a layer "
                f"{tuple(param.shape)} split {self.out_sizes}"
            )
        if isinstance(tensor, Int4Weight):
            self._int4_parts[part] = tensor
            return
        start = sum(self.out_sizes[:part])
        param.data[start:start + rows].copy_(tensor)

    def process_weights_after_loading(self) -> None:
        """Choose the method: int4 when every part arrived 4-bit (the float copy is kept for
        large steps); 4-bit parts of a mixed layer are dequantized only."""
        parts = self._int4_parts
        self._int4_parts = {}
        if parts and len(parts) == len(self.out_sizes):
            self.method = Int4CpuMethod(Int4Weight.cat([parts[i] for i in sorted(parts)]))
        for part, w in parts.items():
            start = sum(self.out_sizes[:part])
            self.weight.data[start:start + self.out_sizes[part]].copy_(w.dequantize())
        self.method.process_weights_after_loading(self)
