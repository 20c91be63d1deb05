"""The contract of a quantized Linear method, and parameters that load merged layers' parts.

A method creates the layer's checkpoint-shaped parameters (`create_weights`), each with its own
weight_loader, turns what was loaded into the form its kernels read
(`process_weights_after_loading`), and applies it: on CUDA through a Triton kernel, elsewhere
through the plain-torch reference (dequantize, then matmul)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tuili.layers.linear import Linear, LinearMethod, matmul


# Rows up to which a quantized layer's GPU path is its decode GEMV (kernels/triton_quant.py).
GEMV_MAX_ROWS = 8


class QuantMethod(LinearMethod):
    fusable = False  # the float decode GEMV cannot read packed weights
    use_triton = False  # the device path, chosen once by quantization.prepare

    def create_weights(self, layer: Linear) -> None:
        """Replace or add the layer's parameters as the checkpoint names them (default: none)."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Turn the loaded tensors into the form apply reads."""

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The weight [out, in] in float32, as the quantized tensors encode it."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            out = self.fused_gemv(layer, x)
            return self.apply_triton(layer, x) if out is None else out
        return matmul(x, self.cpu_weight(layer, x.dtype), layer.bias)

    def apply_triton(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The GPU path where the decode GEMV (fused_gemv) does not serve; this default
        dequantizes at every call."""
        return matmul(x, self.dequantize(layer).to(x.dtype), layer.bias)

    def fused_gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        if not (self.use_triton and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS):
            return None
        return self.gemv(layer, x, **fusions)

    def gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        """The format's decode GEMV (kernels/triton_quant.py) of 1..GEMV_MAX_ROWS rows with
        fused_gemv's fusions, or None where it has none (this default)."""
        return None

    def cpu_weight(self, layer: Linear, dtype: torch.dtype, make=None) -> torch.Tensor:
        """The dequantized weight for a device without a kernel for the format, made once: the
        values the format encodes (so the quality is the format's), not its bytes or speed."""
        cached = layer.__dict__.get("_dequantized")
        if cached is None or cached.dtype != dtype:
            cached = (make or self.dequantize)(layer).to(dtype)
            layer.__dict__["_dequantized"] = cached
        return cached


def add_param(layer: Linear, name: str, shape: tuple[int, ...], dtype: torch.dtype,
              out_dim: int | None, pack: int = 1, optional: bool = False,
              in_dim: int | None = None, in_per: int = 1) -> nn.Parameter:
    """Register `name` on layer. out_dim: the dimension holding the output features, `pack` of
    them per element (None: the tensor is the layer's whole, unsplit, e.g. g_idx); a merged
    layer's part p loads into its slice of that dimension. in_dim: the dimension holding the
    input features, in_per of them an element (None: not along them, e.g. per-channel scales).
    A tensor-parallel rank reads only its shard (layer.shard_of). optional: a checkpoint may
    omit it."""
    param = nn.Parameter(torch.zeros(shape, dtype=dtype, device=layer.params_device), requires_grad=False)
    param.num_parts = 1 if out_dim is None else len(layer.out_sizes)
    param.optional = optional
    param.reads_slices = True  # load() below reads this rank's shard of a lazy tensor

    def load(param: nn.Parameter, tensor, part: int = 0) -> None:
        tensor = shard(layer, tensor, part, out_dim, pack, in_dim, in_per)
        if out_dim is None:
            if tensor.shape != param.shape:
                raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(tensor)
            return
        sizes = [s // pack for s in layer.out_sizes]
        if any(s % pack for s in layer.out_sizes):
            raise ValueError(f"output parts {layer.out_sizes} are not multiples of {pack}")
        target = param.data.narrow(out_dim, sum(sizes[:part]), sizes[part])
        if tensor.numel() == 1:  # a per-tensor scale: every output feature of the part takes it
            target.fill_(tensor.reshape(()).item())
            return
        if tensor.dim() != target.dim() and tensor.numel() == target.numel():
            tensor = tensor.reshape(target.shape)  # a [N, 1] scale for an [N] one
        if tensor.shape != target.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit part {part} "
                             f"{tuple(target.shape)} of a layer split {layer.out_sizes}")
        target.copy_(tensor)

    param.weight_loader = load
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_parameter(name, param)
    return param


def shard(layer: Linear, tensor, part: int, out_dim: int | None, out_per: int,
          in_dim: int | None, in_per: int) -> torch.Tensor:
    """This rank's piece of a checkpoint tensor, read (a lazy safetensors slice reads only it);
    a one-element tensor (a per-tensor scale) is every rank's whole."""
    if math.prod(tensor.shape) > 1:
        tensor = layer.shard_of(tensor, part, out_dim, out_per, in_dim, in_per)
    return tensor.materialize() if hasattr(tensor, "materialize") else tensor


def drop_weight(layer: Linear) -> None:
    """The float weight is not the checkpoint's (a shared one, the tied LM head's, stays with
    its owner, the embedding)."""
    if "weight" in layer._parameters:
        del layer._parameters["weight"]
