"""INT8 weights, activations 16-bit (W8A16): float weights quantized at load, symmetric, one
float scale per output channel. On CPU torch's int8 weight kernel reads the int8 bytes; on CUDA
the dequantizing GEMV serves decode rows."""

from __future__ import annotations

import torch
from torch import nn

from tuili.kernels import cpu_vnni, triton_module
from tuili.layers.linear import UNQUANTIZED, Int4CpuMethod, Linear, LinearMethod, matmul
from tuili.quantization.base import QuantMethod, add_param
from tuili.quantization.config import QuantConfig
from tuili.quantization.fp8 import quantize_per_row

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

    def gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        return triton_module("triton_quant").scaled_gemv(x, layer.weight, layer.weight_scale,
                                                         layer.bias, **fusions)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        # The CPU kernel is slower than dequantize + matmul for float32 batches (BENCHMARKS.md).
        if not self.use_triton and CPU_KERNEL and x.dim() == 2 and not x.is_cuda and (
                x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and x.shape[0] <= 4)):
            out = torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
            return out if layer.bias is None else out + layer.bias
        return super().apply(layer, x)


# The LM head of the CPU int4 path (a GGUF's 4-bit layers kept packed) in int8, as the engine's
# quantize_lm_head asks (unset: where the file stores its head quantized; the loader decides):
# on the 2-core dev VM the int8 kernel reads SmolLM2's [49152, 576] head in 1.7 ms where the
# bf16 one takes 3.6 ms (F.linear) to 8.3 ms (torch.mv), one thread (BENCHMARKS.md, 2026-12-07).
# SmolLM2's file stores that table as Q8_0 (8 bits, a scale per 32 weights): the run reads 8-bit
# weights too, re-quantized with a scale per row (the kernel's form) from their bf16 values.


class Int8HeadMethod(LinearMethod):
    """A 16-bit LM head also held in int8, one scale per vocabulary row. Its weight stays as it
    is: tied to the embedding, whose lookups read it. Steps of up to MAX_ROWS rows (decode) read
    the int8 copy; larger ones (prefill, big batches), where the int8 kernel is the slower, the
    16-bit weight."""

    name = "int8"
    fusable = False
    MAX_ROWS = 8

    def __init__(self, weight: torch.Tensor):
        # The kernel takes its scales in the activations' dtype: quantize against those, so the
        # rounding of the scale does not add to the weights' error.
        self.scale = quantize_per_row(weight, torch.int8, 127)[1].to(weight.dtype)
        q = self.quantized(weight)
        # On AVX512-VNNI CPUs kernels/cpu_vnni reads the same int8 weights (its own layout) with
        # the activations quantized to int8 (a scale per 16): 2.5x torch's kernel, one thread.
        self.vnni = cpu_vnni.module() if cpu_vnni.fits(*weight.shape) else None
        if self.vnni is not None:
            self.q, self.float_scale = cpu_vnni.pack_int8(q), self.scale.float()
        else:
            self.q = q
        # The tensors the int8 kernel reads (their bytes are what a decode step reads).
        self.tensors = (self.q, self.float_scale if self.vnni is not None else self.scale)

    def quantized(self, weight: torch.Tensor) -> torch.Tensor:
        """The int8 weights [N, K] the kernel reads (weight: the head's 16-bit table)."""
        q = (weight.float() / self.scale.float()[:, None]).round().clamp(-127, 127)
        return q.to(torch.int8).contiguous()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] > self.MAX_ROWS or x.dtype != self.scale.dtype:
            return matmul(x, layer.weight, layer.bias)
        if self.vnni is not None:
            out = self.vnni.int8_gemv(x.contiguous(), self.q, self.float_scale)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return out if layer.bias is None else out + layer.bias


def int8_cpu_head(model: nn.Module) -> bool:
    """Give `model.lm_head` Int8HeadMethod where its layers run the CPU int4 path (their 4-bit
    weights kept packed), the head is a 16-bit one and the family has been measured with it
    (`supports_int8_cpu_head`: the Llama family's). Returns whether it did."""
    head = getattr(model, "lm_head", None)
    if not (getattr(model, "supports_int8_cpu_head", False) and CPU_KERNEL
            and isinstance(head, Linear)
            and head.method is UNQUANTIZED and head.weight.dtype == torch.bfloat16
            and head.weight.device.type == "cpu"
            and any(isinstance(m, Linear) and isinstance(m.method, Int4CpuMethod)
                    for m in model.modules())):
        return False
    head.method = Int8HeadMethod(head.weight.data)
    # Buffers: the module's state (and its memory) shows them; not saved with it.
    head.register_buffer("int8_weight", head.method.q, persistent=False)
    head.register_buffer("int8_scale", head.method.scale, persistent=False)
    return True
