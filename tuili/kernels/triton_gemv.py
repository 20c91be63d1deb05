"""Decode GEMV for a few rows (M <= 8): y = prologue(x) @ W^T (+ bias) (+ residual) in one launch.

The prologue is RMSNorm(x) or silu_and_mul of a merged [gate | up] x, computed inside each program
from x (a few thousand elements, re-read from L2); the epilogue adds the residual stream and writes
the new one. Each step rounds to the model dtype where kernels/reference.py does, so only the dot's
summation order differs from norm kernel + cuBLAS + add. Each program owns BLOCK_N output columns
and streams their weight rows once; the weight read is the whole cost at decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 8
PLAIN, RMS_NORM, SILU_AND_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, norm_w_ptr, eps, M, N, K,
                 stride_x, stride_r,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM_BLOCK: tl.constexpr, USE_DOT: tl.constexpr):
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m[:, None] * stride_x
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    if PROLOGUE == 1:  # RMSNorm needs each row's 1/rms before the first normalised element
        kn = tl.arange(0, NORM_BLOCK)
        squares = tl.zeros([M_PAD, NORM_BLOCK], tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            v = tl.load(x_rows + (k0 + kn)[None, :], mask=m_mask[:, None] & (k0 + kn < K)[None, :],
                        other=0.0).to(tl.float32)
            squares += v * v
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x_mask = m_mask[:, None] & k_mask[None, :]
        if PROLOGUE == 2:
            gate = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
            up = tl.load(x_rows + K + kk[None, :], mask=x_mask, other=0.0)
            g = gate.to(tl.float32)
            # fast division: 2 ulp of float32 vanish in the rounding to 16 bits
            act = tl.fdiv(g, 1.0 + tl.exp(-g)).to(gate.dtype)
            xv = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
        else:
            xv = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
            if PROLOGUE == 1:
                nw = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0)
                h = (xv.to(tl.float32) * rstd[:, None]).to(xv.dtype)
                xv = (nw[None, :].to(tl.float32) * h.to(tl.float32)).to(xv.dtype)
        if USE_DOT:
            acc += tl.dot(w, tl.trans(xv))
        else:
            acc += tl.sum(xv[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    if USE_DOT:
        y = tl.trans(acc)
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y.to(out_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:  # the residual add, rounded as a separate add would round it
        r = tl.load(res_ptr + m[:, None] * stride_r + n[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m[:, None] * N + n[None, :], y, mask=mask)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # tensor-core dot (rows padded by Triton), else FMA and a reduction


def default_config(m: int, n: int, k: int, prologue: int = PLAIN) -> GemvConfig | None:
    """Tiles for an [m, k] x [n, k]^T GEMV by shape, measured on an H100 (benchmarks/gemv_sweep.py);
    None where cuBLAS (with a separate prologue) is faster."""
    if k <= 1024 and n >= 32768:
        return None  # a short, wide LM head (SmolLM2's): cuBLAS keeps more bytes in flight
    if m <= 2 and (n * k <= 8 << 20 or (m == 1 and n > k)):
        return GemvConfig(block_n=2, block_k=1024)
    if n >= 2 * k:
        return GemvConfig(block_n=64, block_k=256, num_stages=3, use_dot=True)
    return GemvConfig(block_n=32 if k >= 4096 else 16, block_k=512, num_stages=3, use_dot=True)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, silu_and_mul: bool = False, config: GemvConfig | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """prologue(x) @ weight.T (+ bias) (+ residual) for x of M <= 8 rows. The prologue is
    rmsnorm(x; norm_weight, eps) if norm_weight is given, silu(gate) * up if silu_and_mul (x is
    [M, 2K]), else none. weight: [N, K] contiguous; returns [M, N] in x's dtype (into out if given).
    config: tiles, default_config's when None (which must not be None for this shape then)."""
    m = x.shape[0]
    n, k = weight.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv serves 1..{MAX_ROWS} rows, got {m}")
    if x.shape[1] != (2 * k if silu_and_mul else k):
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}"
                         f"{' (silu_and_mul: x is [M, 2K])' if silu_and_mul else ''}")
    if x.stride(1) != 1:
        x = x.contiguous()
    assert weight.is_contiguous()
    prologue = RMS_NORM if norm_weight is not None else SILU_AND_MUL if silu_and_mul else PLAIN
    cfg = config or default_config(m, n, k, prologue)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.is_contiguous()
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    m_pad = triton.next_power_of_2(m)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, out, bias if bias is not None else out,
        residual if residual is not None else out,
        norm_weight if norm_weight is not None else out, eps, m, n, k, x.stride(0),
        residual.stride(0) if residual is not None else 0,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NORM_BLOCK=min(triton.next_power_of_2(k), 8192 // m_pad), USE_DOT=cfg.use_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
