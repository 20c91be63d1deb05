"""INT8 weights, activations 16-bit (W8A16): float weights quantized at load, symmetric, one
float scale per output channel. On CPU torch's int8 weight kernel reads the int8 bytes; on CUDA
the dequantizing GEMV serves decode rows."""

from __future__ import annotations

import torch

from tuili.kernels import triton_module
from tuili.layers.linear import Linear
from tuili.quantization.base import QuantMethod, add_param
from tuili.quantization.config import QuantConfig
from tuili.quantization.fp8 import GEMV_MAX_ROWS, quantize_per_row

CPU_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Method(QuantMethod):
    name = "int8"

    def __init__(self, qc: QuantConfig, layer: Linear):
        self.qc = qc

    def process_weights_after_loading(self, layer: Linear) -> None:
        q, scale = quantize_per_row(layer.weight.data, torch.int8, 127,
                                    layer.row_absmax(layer.weight.data))
        add_param(layer, "weight", tuple(q.shape), torch.int8, out_dim=0).data.copy_(q)
        # Scales in the activations' dtype: the CPU kernel wants them so.
        add_param(layer, "weight_scale", tuple(scale.shape), layer.params_dtype,
                  out_dim=0).data.copy_(scale)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale.float()[:, None]

    def apply_triton(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS:
            return triton_module("triton_quant").scaled_gemv(x, layer.weight, layer.weight_scale,
                                                             layer.bias)
        return super().apply_triton(layer, x)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        # The CPU kernel is slower than dequantize + matmul for float32 batches (BENCHMARKS.md).
        if not self.use_triton and CPU_KERNEL and x.dim() == 2 and not x.is_cuda and (
                x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and x.shape[0] <= 4)):
            out = torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
            return out if layer.bias is None else out + layer.bias
        return super().apply(layer, x)
