"""GGUF files' quantized weights kept packed: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K blocks, as planes
(kernels/reference_gguf.py), read on CUDA by kernels/triton_gguf.py.

A merged layer's parts (q/k/v, gate/up) may come in different types (a Q4_K_M file stores v and
down in Q6_K): the layer holds its rows as segments, one per run of parts of one type, each
applied by its own kernel into its columns of the output. A part of a type without a kernel
(Q5_0, Q2_K, F16, ...) arrives dequantized and is a float segment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuili.kernels import HAS_TRITON, triton_module
from tuili.kernels.reference_gguf import TYPES, GgufPlanes, bits_per_weight, planes_from_blocks
from tuili.layers.linear import Linear, matmul
from tuili.quantization.base import QuantMethod, drop_weight

# Steps of up to so many rows read the packed planes (triton_gguf.TILE_MAX_ROWS); larger ones
# also write and read a 16-bit copy of each weight.
PACKED_MAX_ROWS = 256
__all__ = ["PACKED_MAX_ROWS", "TYPES", "GgufMethod", "GgufTensor", "bits_per_weight", "prepare_gguf"]


@dataclass
class GgufTensor:
    """A GGUF tensor's blocks as the file holds them: uint8 [rows, bytes per row]."""
    qtype: str
    blocks: torch.Tensor
    cols: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.shape[0], self.cols))

    def permute_rows(self, fn) -> GgufTensor:
        return GgufTensor(self.qtype, fn(self.blocks), self.cols)

    def planes(self) -> GgufPlanes:
        return planes_from_blocks(self.blocks, self.qtype, self.cols)


@dataclass
class Segment:
    """Output rows [start, start + rows) of a layer: packed planes, or a float weight."""
    start: int
    rows: int
    planes: GgufPlanes | None = None
    weight: torch.Tensor | None = None


class GgufMethod(QuantMethod):
    name = "gguf"

    def __init__(self, layer: Linear):
        self.parts: dict[int, GgufTensor | torch.Tensor] = {}
        self.segments: list[Segment] = []

    def create_weights(self, layer: Linear) -> None:
        """`weight` becomes a placeholder whose loader keeps each part as it comes (this rank's
        piece of it, under tensor parallelism)."""
        reads_slices = getattr(layer.weight, "reads_slices", False)
        drop_weight(layer)
        param = nn.Parameter(torch.empty(0, device=layer.params_device), requires_grad=False)
        param.num_parts = len(layer.out_sizes)
        param.reads_slices = reads_slices
        param.weight_loader = lambda p, t, part=0: self.load_part(p, layer.shard_of(t, part), part)
        layer.register_parameter("weight", param)
        self.layer_shape = (layer.out_sizes, layer.in_features)

    def load_part(self, param: nn.Parameter, tensor, part: int = 0) -> None:
        sizes, cols = self.layer_shape
        if tuple(tensor.shape) != (sizes[part], cols):
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit part {part} "
                             f"({sizes[part]}, {cols}) of a layer split {sizes}")
        self.parts[part] = tensor

    def process_weights_after_loading(self, layer: Linear) -> None:
        device, dtype = layer.params_device, layer.params_dtype
        drop_weight(layer)
        start, runs = 0, []  # runs of consecutive parts of one type (None: float)
        for part in range(len(layer.out_sizes)):
            t = self.parts.pop(part)
            kind = t.qtype if isinstance(t, GgufTensor) else None
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(t)
            else:
                runs.append((kind, [t]))
        for kind, tensors in runs:
            rows = sum(t.shape[0] for t in tensors)
            if kind is None:
                weight = torch.cat([t.to(dtype) for t in tensors]).to(device)
                self.segments.append(Segment(start, rows, weight=weight))
            else:
                planes = GgufPlanes.cat([t.planes() for t in tensors]).to(device)
                self.segments.append(Segment(start, rows, planes=planes))
            start += rows
        # The planes as buffers: the module's state (and its memory) shows them.
        for i, s in enumerate(self.segments):
            for j, t in enumerate(s.planes.tensors() if s.planes else [s.weight]):
                layer.register_buffer(f"gguf_{i}_{j}", t, persistent=False)

    def packed_bits(self) -> tuple[float, int]:
        """(bits, weights) of this layer as stored (float segments at their dtype's width)."""
        bits = sum(8 * s.planes.nbytes if s.planes else s.weight.numel() * s.weight.element_size() * 8
                   for s in self.segments)
        return bits, sum(s.rows for s in self.segments) * self.layer_shape[1]

    def dequantize(self, layer: Linear) -> torch.Tensor:
        from tuili.kernels.reference_gguf import dequantize

        return torch.cat([dequantize(s.planes) if s.planes else s.weight.float()
                          for s in self.segments])

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.use_triton:
            return matmul(x, self.cpu_weight(layer, x.dtype), layer.bias)
        kernels = triton_module("triton_gguf")
        if len(self.segments) == 1 and self.segments[0].planes is not None:
            return kernels.gguf_linear(x, self.segments[0].planes, layer.bias)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        out = torch.empty(x.shape[0], sum(s.rows for s in self.segments), dtype=x.dtype,
                          device=x.device)
        for s in self.segments:
            bias = None if layer.bias is None else layer.bias[s.start:s.start + s.rows]
            view = out[:, s.start:s.start + s.rows]
            if s.planes is not None:
                kernels.gguf_linear(x, s.planes, bias, out=view)
            else:
                view.copy_(F.linear(x, s.weight, bias))
        return out.reshape(*shape[:-1], out.shape[-1])


def prepare_gguf(model: nn.Module, quantize_lm_head: bool = False) -> list[str]:
    """Give each Linear of `model` the GGUF method before its weights load (the LM head only if
    asked, and never one tied to the embedding); returns the names of those layers."""
    tables = {id(p) for m in model.modules() if not isinstance(m, Linear)
              for p in m.parameters(recurse=False)}  # an LM head tied to them stays theirs
    done = []
    for name, layer in model.named_modules():
        # A tensor-parallel LM head pads its rows (layers/parallel.py): it stays float.
        sharded = getattr(getattr(layer, "tp", None), "size", 1) > 1
        if not isinstance(layer, Linear) or (name == "lm_head" and (not quantize_lm_head or
                                                                    sharded)):
            continue
        if id(layer.weight) in tables:
            continue
        layer.params_dtype, layer.params_device = layer.weight.dtype, layer.weight.device
        layer.method = GgufMethod(layer)
        layer.method.use_triton = layer.params_device.type == "cuda" and HAS_TRITON
        layer.method.create_weights(layer)
        done.append(name)
    return done


def gguf_bits(model: nn.Module) -> float | None:
    """Bits per weight of the layers kept packed, scales included (None: no layer is)."""
    bits = weights = 0
    for name, layer in model.named_modules():
        if isinstance(layer, Linear) and isinstance(layer.method, GgufMethod) and name != "lm_head":
            b, w = layer.method.packed_bits()
            bits, weights = bits + b, weights + w
    return bits / weights if weights else None
