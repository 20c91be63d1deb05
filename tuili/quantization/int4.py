"""W4A16 linear methods: GPTQ and AWQ checkpoints, and float weights quantized at load (int4).

All three end in one form, the one the kernels read: `qweight` [K/8, N] int32 (GPTQ's packing,
along the input dimension), `scales` and `zeros` [K/group, N] (w = (q - zero) * scale), and, for a
GPTQ act-order checkpoint, `perm`: input channels sorted by group, so that groups are contiguous
and the input is gathered by perm instead of each weight's scale by g_idx.

Under tensor parallelism a column-parallel rank reads its output columns of every tensor; a
row-parallel one its input rows, in whole groups (else an error naming the sizes), or, for
act-order, its channels of g_idx with every group's scales: its channels' groups are then runs
of varying length, padded to one (gptq_order)."""

from __future__ import annotations

import torch

from tuili.kernels import reference_quant, triton_module
from tuili.layers import int4 as cpu_int4
from tuili.layers.linear import Linear, matmul
from tuili.errors import InvalidParameter
from tuili.quantization.base import QuantMethod, add_param, drop_weight, shard
from tuili.quantization.config import QuantConfig
from tuili.quantization.packing import AWQ_ORDER, pack_rows, unpack_cols, unpack_rows


def scale_dtype(layer: Linear) -> torch.dtype:
    """Scales and zeros in float32 for float32 runs, else float16 (the checkpoints' own)."""
    return torch.float32 if layer.params_dtype == torch.float32 else torch.float16


class Int4Method(QuantMethod):
    """The common form's dequantize and apply; subclasses load their format into it."""

    bits = 4

    def __init__(self, qc: QuantConfig, layer: Linear):
        k = layer.in_features
        full = getattr(layer, "in_full", k)  # a row-parallel shard's whole layer (parallel.py)
        self.group = k if qc.group_size == -1 else qc.group_size
        if k % 8 or any(s % 8 for s in layer.out_sizes):
            raise ValueError(f"a {self.name} layer needs in ({k}) and outputs {layer.out_sizes} "
                             "divisible by 8")
        # Act-order on a row-parallel shard: its input channels fall in any of the layer's
        # groups, so it keeps every group's scales and zeros (and g_idx of its channels).
        self.all_groups = qc.desc_act and qc.group_size != -1 and k != full
        if full % self.group:
            raise ValueError(f"a {self.name} layer needs in ({full}) divisible by the group "
                             f"size ({self.group})")
        if k % self.group and not self.all_groups:
            raise InvalidParameter("tensor_parallel_size", f"{self.name} group size "
                                   f"{self.group} does not divide this rank's {k} of the "
                                   f"layer's {full} input features (tensor_parallel_size="
                                   f"{full // k}): a row-parallel shard holds whole groups; "
                                   f"choose a size that divides its {full // self.group} groups")
        self.qc, self.groups = qc, (full if self.all_groups else k) // self.group
        # The first of the shard's groups in the checkpoint's numbering (g_idx, scale rows).
        self.first_group = 0 if self.all_groups or qc.group_size == -1 else \
            getattr(layer, "in_start", 0) // self.group

    def group_dims(self) -> dict:
        """add_param's input-dimension arguments for the [groups, ...] tensors: split by
        groups, or (one group per channel; act-order on a row shard) read whole."""
        whole = self.all_groups or self.qc.group_size == -1
        return dict(in_dim=None) if whole else dict(in_dim=0, in_per=self.group)

    def set_common(self, layer: Linear, q: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, perm: torch.Tensor | None = None) -> None:
        """q [K, N] values, scales and zeros [G, N]: register the kernels' form."""
        for name in ("qweight", "qzeros", "g_idx"):
            layer._parameters.pop(name, None)
        dt = scale_dtype(layer)
        layer.register_parameter("qweight", _frozen(pack_rows(q)))
        layer.register_parameter("scales", _frozen(scales.to(dt)))
        layer.register_parameter("zeros", _frozen(zeros.to(dt)))
        layer.perm = perm
        layer.cpu_int4 = None
        if cpu_kernel_fits(layer, self.group):
            # torch's int4 CPU kernel reads w = (q - 8) * scale + offset: offset = (8 - zero) * scale.
            offset = (8 - zeros.float()) * scales.float()
            layer.cpu_int4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.t().contiguous().to(torch.int32), 1),
                torch.stack([scales.float(), offset], -1).to(torch.bfloat16).contiguous())

    def unpacked(self, layer: Linear) -> torch.Tensor:
        """The weight [N, K] in float32 in the kernels' input order (perm applied)."""
        return reference_quant.dequantize_int4(layer.qweight, layer.scales, layer.zeros, self.group)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        w = self.unpacked(layer)
        if layer.perm is None:
            return w
        k = layer.in_features  # column k: the padding's zero input (gptq_order)
        out = w.new_zeros(w.shape[0], k + 1).index_copy_(1, layer.perm, w)
        return out[:, :k]

    def gathered(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x's input channels in the kernels' order (index k of perm: a zero, for padding)."""
        if layer.perm is None:
            return x
        if layer.perm.numel() != x.shape[-1]:  # longer exactly where it pads (gptq_order)
            x = torch.nn.functional.pad(x, (0, 1))
        return x.index_select(-1, layer.perm)

    def gemv(self, layer: Linear, x: torch.Tensor, **fusions):
        """The 4-bit GEMV, reading x in act-order's order itself (no gather)."""
        return triton_module("triton_quant").int4_gemv(
            x, layer.qweight, layer.scales, layer.zeros, self.group, layer.bias, perm=layer.perm,
            **fusions)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if (out := self.fused_gemv(layer, x)) is not None:
            return out
        x = self.gathered(layer, x)
        if self.use_triton:
            return triton_module("triton_quant").int4_linear(
                x, layer.qweight, layer.scales, layer.zeros, self.group, layer.bias)
        if layer.cpu_int4 is not None and x.dtype == torch.bfloat16 and x.dim() == 2:
            out = cpu_int4.int4_linear(x, *layer.cpu_int4, group=self.group)
            return out if layer.bias is None else out + layer.bias
        return matmul(x, self.cpu_weight(layer, x.dtype, self.unpacked), layer.bias)


class GptqMethod(Int4Method):
    """AutoGPTQ's tensors: qweight [K/8, N] packed along K, qzeros [G, N/8] packed along N (v1
    checkpoints store zero - 1), scales [G, N], g_idx [K] (the group of each input channel)."""

    name = "gptq"

    def create_weights(self, layer: Linear) -> None:
        k, n, g = layer.in_features, sum(layer.out_sizes), self.groups
        drop_weight(layer)
        add_param(layer, "qweight", (k // 8, n), torch.int32, out_dim=1, in_dim=0, in_per=8)
        add_param(layer, "qzeros", (g, n // 8), torch.int32, out_dim=1, pack=8,
                  **self.group_dims())
        add_param(layer, "scales", (g, n), torch.float32, out_dim=1, **self.group_dims())
        g_idx = add_param(layer, "g_idx", (k,), torch.int32, out_dim=None, optional=True,
                          in_dim=0)
        # What a checkpoint without one means (in the checkpoint's numbering of groups).
        g_idx.data.copy_(torch.arange(k) // self.group + self.first_group)
        g_idx.num_parts = len(layer.out_sizes)
        g_idx.weight_loader = lambda p, t, part=0: self.load_g_idx(
            p, shard(layer, t, part, None, 1, 0, 1), part)

    @staticmethod
    def load_g_idx(param: torch.nn.Parameter, tensor: torch.Tensor, part: int = 0) -> None:
        """Parts of a merged layer read the same input, so GPTQ's act-order gives them the same
        g_idx (the order comes from the input's statistics); one g_idx serves them all."""
        if tensor.shape != param.shape:
            raise ValueError(f"g_idx of shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        seen = param.__dict__.setdefault("parts_loaded", set())
        if seen and not torch.equal(param.data, tensor.to(param.dtype)):
            raise ValueError(f"g_idx of part {part} differs from part {min(seen)}'s; the parts "
                             "of a merged layer (q/k/v, gate/up) must share one act-order")
        param.data.copy_(tensor)
        seen.add(part)

    def process_weights_after_loading(self, layer: Linear) -> None:
        q = unpack_rows(layer.qweight.data)
        scales = layer.scales.data
        zeros = unpack_cols(layer.qzeros.data) + self.qc.zero_offset
        g_idx = layer.g_idx.data.long() - self.first_group
        if g_idx.min() < 0 or g_idx.max() >= self.groups:
            raise ValueError(f"g_idx names groups {int(g_idx.min()) + self.first_group}.."
                             f"{int(g_idx.max()) + self.first_group}, outside this layer's "
                             f"{self.first_group}..{self.first_group + self.groups - 1} (an "
                             "act-order checkpoint whose config says desc_act false?)")
        if self.all_groups:  # a row shard keeps only the groups its channels fall in
            used = torch.bincount(g_idx, minlength=self.groups) > 0
            if not used.all():
                scales, zeros = scales[used], zeros[used]
                g_idx = (torch.cumsum(used, 0) - 1)[g_idx]
        if torch.equal(g_idx, torch.arange(len(g_idx), device=g_idx.device) // self.group):
            self.set_common(layer, q, scales, zeros)
            return
        counts = torch.bincount(g_idx, minlength=len(scales))
        if not self.all_groups and not torch.all(counts == self.group):
            raise ValueError(f"g_idx does not put {self.group} input channels in each group")
        q, perm, self.group = gptq_order(q, g_idx, counts)
        self.set_common(layer, q, scales, zeros, perm)


def gptq_order(q: torch.Tensor, g_idx: torch.Tensor, counts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Act-order's input channels sorted by group, each group's run padded to one length L (the
    longest run's, or more so the rows fill whole 8-row words): (q [groups * L, N], perm
    [groups * L], L). perm[i] is the input channel of row i, or k (x's appended zero) for
    padding. Padding is only needed where a row-parallel shard holds a varying number of each
    group's channels; the whole layer's groups are full (L = the group size, perm a
    permutation)."""
    k, groups = len(g_idx), len(counts)
    size = int(counts.max())
    while groups * size % 8:
        size += 1
    order = torch.argsort(g_idx, stable=True)
    sorted_groups = g_idx[order]
    first = torch.cumsum(counts, 0) - counts
    rows = sorted_groups * size + torch.arange(k, device=q.device) - first[sorted_groups]
    perm = torch.full((groups * size,), k, dtype=torch.long, device=q.device)
    perm[rows] = order
    padded = torch.zeros(groups * size, q.shape[1], dtype=q.dtype, device=q.device)
    padded[rows] = q[order]
    return padded, perm, size


class AwqMethod(Int4Method):
    """AutoAWQ's GEMM tensors: qweight [K, N/8] and qzeros [G, N/8], both packed along N in
    AWQ_ORDER, and scales [G, N]."""

    name = "awq"

    def create_weights(self, layer: Linear) -> None:
        k, n, g = layer.in_features, sum(layer.out_sizes), self.groups
        drop_weight(layer)
        add_param(layer, "qweight", (k, n // 8), torch.int32, out_dim=1, pack=8, in_dim=0)
        add_param(layer, "qzeros", (g, n // 8), torch.int32, out_dim=1, pack=8,
                  **self.group_dims())
        add_param(layer, "scales", (g, n), torch.float32, out_dim=1, **self.group_dims())

    def process_weights_after_loading(self, layer: Linear) -> None:
        q = unpack_cols(layer.qweight.data, AWQ_ORDER)
        zeros = unpack_cols(layer.qzeros.data, AWQ_ORDER)
        self.set_common(layer, q, layer.scales.data, zeros)


class Int4AtLoadMethod(Int4Method):
    """A float weight quantized at load: round-to-nearest with a scale and zero point per group
    of the input dimension (128, or the largest of 64, 32 that divides it)."""

    name = "int4"

    def __init__(self, qc: QuantConfig, layer: Linear):
        k = layer.in_features
        group = next((g for g in (qc.group_size, 64, 32) if g > 0 and k % g == 0), -1)
        super().__init__(QuantConfig(**{**qc.__dict__, "group_size": group}), layer)

    def process_weights_after_loading(self, layer: Linear) -> None:
        scales, zeros, q = quantize_rtn(layer.weight.data.float(), self.group)
        drop_weight(layer)
        self.set_common(layer, q.t(), scales.t(), zeros.t())


def quantize_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit round-to-nearest of w [N, K] by groups of `group` along K: (scales,
    zeros [N, K/group], q [N, K]), w ~ (q - zero) * scale, the group's min and max exact."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 15)
    return scales, zeros, q.reshape(n, k).to(torch.int32)


def cpu_kernel_fits(layer: Linear, group: int) -> bool:
    """Whether torch's int4 CPU kernel serves this bf16 CPU layer (it measured faster than
    dequantize + matmul at every batch on SmolLM2's shapes)."""
    return (layer.params_device.type == "cpu" and layer.params_dtype == torch.bfloat16
            and cpu_int4.supported() and group in (32, 64, 128, 256))


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.contiguous(), requires_grad=False)
