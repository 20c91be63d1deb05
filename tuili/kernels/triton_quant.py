"""Quantized linears on the GPU; references in kernels/reference_quant.py.

Decode (M <= MAX_ROWS rows): GEMVs that read the packed weight once and unpack it in registers:
4-bit GPTQ-layout words with a scale and zero per group (`int4_gemv`), int8 or FP8 rows with a
scale per output channel (`scaled_gemv`). Larger steps dequantize the 4-bit weight to 16 bits
(`int4_dequantize`), then cuBLAS multiplies. Each program owns BLOCK_N output columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 8


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, stride_x,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_mask = kk < K
        mask = k_mask[:, None] & n_mask[None, :]
        # Word kk // 8 holds row kk in bits 4 * (kk % 8): the 8 rows of a word share one load.
        words = tl.load(qw_ptr + (kk // 8)[:, None] * N + n[None, :], mask=mask, other=0)
        q = ((words >> ((kk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale and zero per column
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = kk // GROUP
            s = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        w = (q - z) * s  # [BLOCK_K, BLOCK_N]
        xv = tl.load(x_ptr + m[:, None] * stride_x + kk[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _scaled_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_x,
                        HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xv = tl.load(x_ptr + m[:, None] * stride_x + kk[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    acc *= tl.load(scale_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [K, N] = (q - zero) * scale, in out's dtype."""
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (kk < K)[:, None] & (n < N)[None, :]
    words = tl.load(qw_ptr + (kk // 8)[:, None] * N + n[None, :], mask=mask, other=0)
    q = ((words >> ((kk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
    g = kk // GROUP
    s = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + kk[:, None] * N + n[None, :], ((q - z) * s).to(out_ptr.dtype.element_ty),
             mask=mask)


def _m_pad(m: int) -> int:
    return max(2, triton.next_power_of_2(m))


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int, bias: torch.Tensor | None = None, block_n: int = 32,
              block_k: int = 256) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] @ the 4-bit weight's dequantized [N, K].T (+ bias) -> [M, N]."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, qweight, scales, zeros, bias if bias is not None else x, out, m, n, k, x.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, M_PAD=_m_pad(m), BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def scaled_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, block_n: int = 8,
                block_k: int = 1024) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] @ (weight * scale[:, None]).T (+ bias): int8 or FP8 weight [N, K]."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _scaled_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, scale, bias if bias is not None else x, out, m, n, k, x.stride(0),
        HAS_BIAS=bias is not None, M_PAD=_m_pad(m), BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                    dtype: torch.dtype, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """The weight as [K, N] in dtype (its transpose is the [N, K] a linear multiplies by)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    _int4_dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, scales, zeros, out, n, k, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMV for decode rows; dequantize + cuBLAS for larger steps."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    if x.shape[0] <= MAX_ROWS:
        out = int4_gemv(x, qweight, scales, zeros, group, bias)
    else:
        out = F.linear(x, int4_dequantize(qweight, scales, zeros, group, x.dtype).t(), bias)
    return out.reshape(*shape[:-1], out.shape[-1])
