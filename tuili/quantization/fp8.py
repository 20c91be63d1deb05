"""FP8 (e4m3) weights with a float32 scale per output channel, per tensor or per block.

From a checkpoint (compressed-tensors' `weight` + `weight_scale`; transformers' fine-grained
`weight` + `weight_scale_inv` per block) or from float weights at load (per channel). On CUDA:
decode rows run a dequantizing GEMV (W8A16); larger steps quantize activations per token and run
on FP8 tensor cores (`torch._scaled_mm`) where the GPU has them."""

from __future__ import annotations

import logging

import torch

from tuili.kernels import triton_module
from tuili.layers.linear import Linear
from tuili.quantization.base import QuantMethod, add_param
from tuili.quantization.config import QuantConfig

log = logging.getLogger("tuili")

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_per_row(w: torch.Tensor, dtype: torch.dtype, qmax: float,
                     amax: torch.Tensor | None = None):
    """(q, scale [rows]) with w ~ q * scale, each row's largest magnitude (or `amax`, the whole
    row's where w is a rank's columns of it) mapped to qmax."""
    amax = w.abs().amax(-1) if amax is None else amax
    scale = (amax.float() / qmax).clamp(min=1e-12)
    q = (w.float() / scale[:, None]).clamp(-qmax, qmax)
    q = q.round() if not dtype.is_floating_point else q
    return q.to(dtype), scale


class Fp8Method(QuantMethod):
    name = "fp8"

    def __init__(self, qc: QuantConfig, layer: Linear):
        self.qc = qc
        self.block = qc.block if qc.fp8_scales == "block" else None
        self.tensor_cores = False  # set at load: CUDA with FP8 tensor cores (sm_89 and later)

    def create_weights(self, layer: Linear) -> None:
        if not self.qc.from_checkpoint:
            return  # the float weight loads as usual, quantized after loading
        n, k = sum(layer.out_sizes), layer.in_features
        add_param(layer, "weight", (n, k), FP8, out_dim=0, in_dim=1)
        if self.block is None:  # a scale per output channel (or one): every input column's
            add_param(layer, "weight_scale", (n,), torch.float32, out_dim=0)
            add_param(layer, "input_scale", (n,), torch.float32, out_dim=0, optional=True)
        else:
            br, bc = self.block
            add_param(layer, "weight_scale_inv", (-(-n // br), -(-k // bc)), torch.float32,
                      out_dim=0, pack=br, in_dim=1, in_per=bc)

    def process_weights_after_loading(self, layer: Linear) -> None:
        if not self.qc.from_checkpoint:
            q, scale = quantize_per_row(layer.weight.data, FP8, FP8_MAX,
                                        layer.row_absmax(layer.weight.data))
            add_param(layer, "weight", tuple(q.shape), FP8, out_dim=0).data.copy_(q)
            add_param(layer, "weight_scale", tuple(scale.shape), torch.float32,
                      out_dim=0).data.copy_(scale)
        if layer.weight.is_cuda:
            major, minor = torch.cuda.get_device_capability(layer.weight.device)
            self.tensor_cores = (major, minor) >= (8, 9) and self.block is None
            if (major, minor) < (8, 9):
                log.info("fp8: this GPU (sm_%d%d) has no FP8 tensor cores; every step runs the "
                         "W8A16 dequantizing GEMV/GEMM", major, minor)

    def scales(self, layer: Linear) -> torch.Tensor:
        """The scale of each weight element's row (channel/tensor) or of its block, [N, K] or [N, 1]."""
        if self.block is None:
            return layer.weight_scale.float()[:, None]
        n, k = layer.weight.shape
        br, bc = self.block
        s = layer.weight_scale_inv.float()
        return s.repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.float() * self.scales(layer)

    def gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        if self.block is not None:  # block scales: no GEMV reads them yet
            return None
        return triton_module("triton_quant").scaled_gemv(x, layer.weight, layer.weight_scale,
                                                         layer.bias, **fusions)

    def apply_triton(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.tensor_cores:
            return fp8_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
        return super().apply_triton(layer, x)


def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x quantized to FP8 per token, x_q @ w^T on FP8 tensor cores, both scales applied after."""
    xq, x_scale = quantize_per_row(x, FP8, FP8_MAX)
    out = torch._scaled_mm(xq, w.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :].float(),
                           out_dtype=x.dtype, bias=bias)
    return out
