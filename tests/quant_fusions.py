"""Weights and the reference chain shared by the quantized GEMVs' fusion tests (interpreted on CPU
in tests/test_quant_fusions_interpreted.py, compiled in tests/gpu/test_quant.py)."""

import torch
import torch.nn.functional as F

from tuili.kernels import reference, reference_quant
from tuili.quantization.fp8 import FP8, FP8_MAX, quantize_per_row
from tuili.quantization.int4 import gptq_order, quantize_rtn
from tuili.quantization.packing import pack_rows

EPS = 1e-5


def unfused(x, linear, norm_w=None, gated=False, residual=None):
    """The reference ops one after another in x's dtype: norm (its scale from x), the linear,
    SiLU-and-mul, the residual add."""
    h = x if norm_w is None else reference.rms_norm(x, norm_w, EPS)
    y = linear(h)
    y = reference.silu_and_mul(y) if gated else y
    return y if residual is None else y + residual


def parts_of_squares(x: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """x's sums of squares per row in `parts` uneven column ranges, as a producer leaves them."""
    return torch.stack([c.float().pow(2).sum(1) for c in x.tensor_split(parts, 1)], 1).contiguous()


def int4_weight(n: int, k: int, group: int, device="cpu", dtype=torch.float32):
    """A random 4-bit weight in the kernels' form: (qweight, scales, zeros, group, perm=None)."""
    scales, zeros, q = quantize_rtn(torch.randn(n, k, device=device), group)
    return (pack_rows(q.t()), scales.t().contiguous().to(dtype), zeros.t().contiguous().to(dtype),
            group, None)


def act_order_weight(n: int, k: int, groups: int, device="cpu", dtype=torch.float32):
    """A row-parallel act-order shard's form: k channels in groups of varying counts, sorted and
    padded to one run length (gptq_order): (qweight, scales, zeros, run length, perm)."""
    g_idx = torch.randint(0, groups, (k,), device=device)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, device=device)
    padded, perm, run = gptq_order(q, g_idx, torch.bincount(g_idx, minlength=groups))
    scales = (torch.rand(groups, n, device=device) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (groups, n), device=device).to(dtype)
    return pack_rows(padded), scales, zeros, run, perm


def int4_reference(qweight, scales, zeros, group, perm):
    """The linear of a 4-bit weight: x gathered in the kernels' order (perm's index k: a zero,
    the padding), dequantize -> matmul."""
    def linear(h):
        if perm is not None:
            h = F.pad(h, (0, 1)).index_select(-1, perm)
        return reference_quant.int4_linear(h, qweight, scales, zeros, group)
    return linear


def scaled_weight(kind: str, rows: int, k: int, device="cpu"):
    """A random int8 or FP8 weight [rows, k] and its per-row scales."""
    w = torch.randn(rows, k, device=device)
    return (quantize_per_row(w, torch.int8, 127) if kind == "int8"
            else quantize_per_row(w, FP8, FP8_MAX))
