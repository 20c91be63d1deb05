"""The device path of a model's layers, chosen once when the model is built: the plain-torch
reference kernels (the CPU's) or Triton's (the GPU's), for norms, activations, the projections'
fusions and attention (`attention.TorchAttention`, `attention.TritonAttention`)."""

from __future__ import annotations

import torch

from tuili.kernels import HAS_TRITON, reference, triton_module
from tuili.kernels.tuning import gpu_traits
from tuili.layers.attention import TorchAttention, TritonAttention
from tuili.layers.linear import Linear

# SmolLM2's whole decode graph on an H100 is faster with the GEMV fusions up to 8 rows
# (BENCHMARKS.md; benchmarks/gpu_decode_graph.py sets this to compare). Read at each call.
GEMV_MAX_ROWS = 8
GEMV_DTYPES = (torch.bfloat16, torch.float16)
# Quantized layers' decode GEMVs take the norms, SiLU and residual adds too (off: each its own
# kernel around the plain GEMV, for comparisons: tests/gpu/test_quant.py). Read at each call.
QUANT_FUSIONS = True


class TorchBackend:
    """The reference kernels: each norm, activation and add its own op."""

    name = "torch"

    def __init__(self):
        self.attention = TorchAttention()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return reference.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual), x + residual)."""
        x = x + residual
        return reference.rms_norm(x, weight, eps), x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a merged [gate | up] projection."""
        return reference.silu_and_mul(x)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether a step of these rows runs its norms and residual adds inside the projections."""
        return False

    def linear(self, x: torch.Tensor, layer: Linear, *, norm=None,
               norm_sumsq: torch.Tensor | None = None, gated: bool = False,
               residual: torch.Tensor | None = None, want_sumsq: bool = False):
        """layer(norm(x)) (x if no norm), then silu(gate) * up if gated (layer is a merged
        [gate | up]), then + residual. With want_sumsq: (out, sums of squares of out per row in
        parts, or None where no fused kernel left them); given to the next call as norm_sumsq,
        they spare its norm a pass over x."""
        out = layer(x if norm is None else norm(x))
        out = self.silu_and_mul(out) if gated else out
        out = out if residual is None else out + residual
        return (out, None) if want_sumsq else out


class TritonBackend(TorchBackend):
    """Triton's kernels; at decode (`fuses`: <= GEMV_MAX_ROWS rows of 16-bit floats) each norm,
    SiLU and residual add rides in a projection's GEMV as its prologue or epilogue: the bf16
    GEMV's (kernels/triton_gemv.py) or a quantized format's (its method's fused_gemv)."""

    name = "triton"

    def __init__(self, device: torch.device):
        self.attention = TritonAttention()
        self._fused = triton_module("triton_fused")
        self._gemv = triton_module("triton_gemv")
        self._gpu = gpu_traits(device)  # the GEMV tiles follow the GPU's memory bandwidth

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._fused.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused.rms_norm(x, weight, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused.silu_and_mul(x)

    def fuses(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= GEMV_MAX_ROWS and x.dtype in GEMV_DTYPES

    def linear(self, x: torch.Tensor, layer: Linear, *, norm=None,
               norm_sumsq: torch.Tensor | None = None, gated: bool = False,
               residual: torch.Tensor | None = None, want_sumsq: bool = False):
        if not layer.method.fusable and self.fuses(x):
            out = self._quantized(x, layer, norm, norm_sumsq, gated, residual, want_sumsq)
            if out is not None:
                return out
        if layer.method.fusable and self.fuses(x):
            weight = layer.weight
            n = weight.shape[0] // 2 if gated else weight.shape[0]
            norm_pass = norm is not None and norm_sumsq is None
            config = self._gemv.default_config(x.shape[0], n, weight.shape[1], norm_pass, gated,
                                               self._gpu)
            if config is not None and layer.reduces:  # the residual joins the summed output
                out = layer.tp.all_reduce(self._gemv.gemv(x, weight, config=config))
                out = out if residual is None else out + residual
                return (out, None) if want_sumsq else out
            if config is not None:
                return self._gemv.gemv(
                    x, weight, layer.bias, residual, norm.weight if norm is not None else None,
                    norm.eps if norm is not None else 0.0, gated, config,
                    sumsq=norm_sumsq if norm is not None else None, want_sumsq=want_sumsq)
        return super().linear(x, layer, norm=norm, gated=gated, residual=residual,
                              want_sumsq=want_sumsq)

    def _quantized(self, x: torch.Tensor, layer: Linear, norm, norm_sumsq, gated, residual,
                   want_sumsq):
        """A quantized layer's decode GEMV with the fusions (`method.fused_gemv`), as the bf16
        GEMV takes them; None where its format has none at these rows."""
        if not QUANT_FUSIONS:
            return None
        if layer.reduces:  # a shard's partial sum: the residual joins the all-reduced output
            if norm is not None or gated:
                return None  # (normed or gated, a layer's whole output: never a row shard's)
            out = layer.method.fused_gemv(layer, x)
            if out is None:
                return None
            out = layer.tp.all_reduce(out)
            out = out if residual is None else out + residual
            return (out, None) if want_sumsq else out
        return layer.method.fused_gemv(
            layer, x, residual=residual, norm_weight=None if norm is None else norm.weight,
            eps=0.0 if norm is None else norm.eps, gated=gated,
            sumsq=None if norm is None else norm_sumsq, want_sumsq=want_sumsq)


Backend = TorchBackend  # the interface; TritonBackend implements it too

TORCH = TorchBackend()


def backend_for(device: torch.device) -> TorchBackend:
    """Triton's kernels for CUDA tensors where Triton is installed, else the torch references."""
    return TritonBackend(device) if device.type == "cuda" and HAS_TRITON else TORCH
