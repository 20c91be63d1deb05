"""Fused Triton kernels for the elementwise work between the matmuls: one launch where eager torch
needs five to eight. References: rms_norm, silu_and_mul and apply_rotary in kernels/reference.py. Each kernel rounds to the model dtype at the same points as the
reference, so outputs match it (and HF) to the last bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual add, rounded
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    y = (h * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rmsnorm(x) or, with a residual, (rmsnorm(x + residual), x + residual). x: [rows, N]."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out, eps, x.stride(0),
            residual.stride(0) if residual is not None else 0, N=n,
            BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None)
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * D + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, two_d = x.shape
    d = two_d // 2
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](x, out, x.stride(0), D=d, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_c,
                   HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF)[None, :]
    mask = h < HEADS
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + j, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
    c1 = tl.load(cos_ptr + t * stride_c + j)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + j)
    s1 = tl.load(sin_ptr + t * stride_c + j)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + j)
    # x * cos + rotate_half(x) * sin in the model dtype, each product and the sum rounded as torch
    # rounds them (launched with fp fusion off, so no multiply-add contracts the steps).
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    out = out_ptr + t * HEADS * 2 * HALF + h * 2 * HALF
    tl.store(out + j, o1, mask=mask)
    tl.store(out + HALF + j, o2, mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, d] (each head's d contiguous); cos, sin: [tokens, 1, d]."""
    tokens, heads, d = x.shape
    assert x.stride(2) == 1 and cos.stride(-1) == 1
    out = torch.empty((tokens, heads, d), dtype=x.dtype, device=x.device)
    if tokens:
        _rotary_kernel[(tokens,)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0),
                                  HEADS=heads, HALF=d // 2,
                                  HEADS_PAD=triton.next_power_of_2(heads), enable_fp_fusion=False)
    return out
