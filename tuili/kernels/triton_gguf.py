"""GGUF block types on the GPU (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), read from their planes
(kernels/reference_gguf.py, which holds the torch reference).

Decode (M <= MAX_ROWS rows): a GEMV that reads each packed byte once and unpacks it in
registers. A row's K values are cut in pieces of L lanes, each piece with one scale pair (a, b)
per row, w = a * q + b; the 4-bit and 6-bit types give each lane two values (its low and high
bits: "halves"), each half a piece of its own. Scales are applied after the lane sums
(a * sum(q x) + b * sum(x)), so each weight costs its unpack and one multiply-add per row.
Up to TILE_MAX_ROWS rows a GEMM decodes each weight tile in registers once per BLOCK_M rows
and multiplies on the tensor cores; larger steps dequantize the weight to the activations'
dtype, then cuBLAS multiplies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tuili.kernels.reference_gguf import GgufPlanes

MAX_ROWS = 8
TILE_MAX_ROWS = 256  # unmeasured: benchmarks/gpu_gguf.py --sweep --rows 16,64,256 times both
QTYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# type -> (L: lanes per piece, halves per lane); a piece spans L * halves values of K.
PIECES = {"Q8_0": (32, 1), "Q4_0": (16, 2), "Q4_1": (16, 2), "Q4_K": (32, 2), "Q5_K": (32, 2),
          "Q6_K": (16, 2)}
# The GEMV's default tile: BLOCK_N rows by 128 values of K (ptxas for sm_90: 40-64 registers at
# one row, no spills). benchmarks/gpu_gguf.py --sweep times the others.
GEMV_BLOCK_N = 8
GEMV_SPAN = 128


@triton.jit
def _as_float(q):
    """Non-negative int32 below 2**23 -> float32 exactly, by its bits (no int-to-float unit)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _k_scale(base, s, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block s from its block's 12 bytes at base."""
    low = s < 4
    x = tl.load(base + s + 4, mask=mask, other=0).to(tl.int32)
    y = tl.load(base + s, mask=mask, other=0).to(tl.int32)
    z = tl.load(base + tl.where(low, s, s - 4), mask=mask, other=0).to(tl.int32)
    sc = tl.where(low, y & 63, (x & 0xF) | ((z >> 6) << 4))
    mn = tl.where(low, x & 63, (x >> 4) | ((y >> 6) << 4))
    return _as_float(sc), _as_float(mn)


@triton.jit
def _decode(qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, n3, p3, l3, mask3, mask_np, K, QT: tl.constexpr):
    """Rows n3 [BN,1,1], pieces p3 [1,P,1], lanes l3 [1,1,L] -> (q_lo, q_hi [BN,P,L] float32;
    a_lo, b_lo, a_hi, b_hi [BN,P,1]; off_lo, off_hi [1,P,L]): w = a * q + b at column off.
    Types of one half return their one half twice."""
    row = n3.to(tl.int64)
    # Each type's K is a multiple of its block (32 or 256 values): rows start 16-byte aligned.
    k2 = tl.multiple_of(K // 2, 16)
    if QT == 0:  # Q8_0: a piece is a block of 32 int8
        u = tl.load(qs_ptr + row * tl.multiple_of(K, 32) + p3 * 32 + l3, mask=mask3, other=128).to(tl.int32)
        q_lo = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # q + 128, - 128
        a_lo = tl.load(d_ptr + row * (K // 32) + p3, mask=mask_np, other=0.0).to(tl.float32)
        b_lo = a_lo * 0.0
        off_lo = p3 * 32 + l3
        return q_lo, q_lo, a_lo, b_lo, a_lo, b_lo, off_lo, off_lo
    elif QT == 1 or QT == 2:  # Q4_0 / Q4_1: a block of 32 is 16 bytes, low nibbles first
        u = tl.load(qs_ptr + row * k2 + p3 * 16 + l3, mask=mask3, other=0).to(tl.int32)
        a = tl.load(d_ptr + row * (K // 32) + p3, mask=mask_np, other=0.0).to(tl.float32)
        if QT == 1:
            b = -8.0 * a
        else:
            b = tl.load(m_ptr + row * (K // 32) + p3, mask=mask_np, other=0.0).to(tl.float32)
        off = p3 * 32 + l3
        return _as_float(u & 0xF), _as_float(u >> 4), a, b, a, b, off, off + 16
    elif QT == 3 or QT == 4:  # Q4_K / Q5_K: a piece is 32 bytes, sub-blocks 2j (low), 2j + 1
        blk = p3 // 4
        j = p3 % 4
        u = tl.load(qs_ptr + row * k2 + p3 * 32 + l3, mask=mask3, other=0).to(tl.int32)
        lo = u & 0xF
        hi = u >> 4
        if QT == 4:  # bit s of high byte i is the fifth bit of sub-block s's value i
            h = tl.load(qh_ptr + row * tl.multiple_of(K // 8, 16) + blk * 32 + l3, mask=mask3, other=0).to(tl.int32)
            lo = lo | (((h >> (2 * j)) & 1) << 4)
            hi = hi | (((h >> (2 * j + 1)) & 1) << 4)
        base = sc_ptr + row * (K // 256 * 12) + blk * 12
        sc_lo, mn_lo = _k_scale(base, 2 * j, mask_np)
        sc_hi, mn_hi = _k_scale(base, 2 * j + 1, mask_np)
        d = tl.load(d_ptr + row * (K // 256) + blk, mask=mask_np, other=0.0).to(tl.float32)
        dmin = tl.load(m_ptr + row * (K // 256) + blk, mask=mask_np, other=0.0).to(tl.float32)
        off = p3 * 64 + l3
        return (_as_float(lo), _as_float(hi), d * sc_lo, -dmin * mn_lo, d * sc_hi, -dmin * mn_hi,
                off, off + 32)
    else:  # Q6_K: piece r of a block (8 of 16 lanes each): half r // 4, sixteenths t = r % 4
        blk = p3 // 8
        r = p3 % 8
        half = r // 4
        t = r % 4
        u = tl.load(qs_ptr + row * k2 + p3 * 16 + l3, mask=mask3, other=0).to(tl.int32)
        h = tl.load(qh_ptr + row * tl.multiple_of(K // 4, 16) + blk * 64 + half * 32 + (t % 2) * 16 + l3,
                    mask=mask3, other=0).to(tl.int32)
        shift = 2 * (t // 2)
        lo = (u & 0xF) | (((h >> shift) & 3) << 4)
        hi = (u >> 4) | (((h >> (shift + 4)) & 3) << 4)
        s = sc_ptr + row * (K // 16) + blk * 16 + half * 8 + t
        d = tl.load(d_ptr + row * (K // 256) + blk, mask=mask_np, other=0.0).to(tl.float32)
        a_lo = d * tl.load(s, mask=mask_np, other=0).to(tl.float32)
        a_hi = d * tl.load(s + 4, mask=mask_np, other=0).to(tl.float32)
        off = blk * 256 + half * 128 + t * 16 + l3
        return _as_float(lo), _as_float(hi), a_lo, -32.0 * a_lo, a_hi, -32.0 * a_hi, off, off + 64


@triton.jit
def _gemv_kernel(x_ptr, qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, bias_ptr, out_ptr, M, N, K,
                 stride_x, stride_out, QT: tl.constexpr, L: tl.constexpr, HALVES: tl.constexpr,
                 M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 P: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n[:, None, None]
    n_ok = n3 < N
    pr = tl.arange(0, P)[None, :, None]
    l3 = tl.arange(0, L)[None, None, :]
    pieces = K // (L * HALVES)
    # Column p of acc holds input row p's sums (P >= M_PAD): one layout for the whole loop.
    acc = tl.zeros([BLOCK_N, P, 1], tl.float32)
    for p0 in range(0, pieces, P):
        p3 = p0 + pr
        p_ok = p3 < pieces
        q_lo, q_hi, a_lo, b_lo, a_hi, b_hi, off_lo, off_hi = _decode(
            qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, n3, p3, l3, n_ok & p_ok, n_ok & p_ok, K, QT)
        for mi in tl.static_range(M_PAD):
            x_ok = p_ok & (M > mi)
            x_lo = tl.load(x_ptr + mi * stride_x + off_lo, mask=x_ok, other=0.0).to(tl.float32)
            t = (a_lo * tl.sum(q_lo * x_lo, axis=2, keep_dims=True)
                 + b_lo * tl.sum(x_lo, axis=2, keep_dims=True))
            if HALVES == 2:
                x_hi = tl.load(x_ptr + mi * stride_x + off_hi, mask=x_ok, other=0.0).to(tl.float32)
                t += (a_hi * tl.sum(q_hi * x_hi, axis=2, keep_dims=True)
                      + b_hi * tl.sum(x_hi, axis=2, keep_dims=True))
            acc += tl.where(pr == mi, tl.sum(t, axis=1, keep_dims=True), 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n3, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pr * stride_out + n3, acc.to(out_ptr.dtype.element_ty),
             mask=n_ok & (pr < M))


@triton.jit
def _gemm_kernel(x_ptr, qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, bias_ptr, out_ptr, M, N, K,
                 stride_x, stride_out, QT: tl.constexpr, L: tl.constexpr, HALVES: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 P: tl.constexpr, IEEE: tl.constexpr):
    """Dequantize-in-tile: each weight tile is decoded once per BLOCK_M rows, in registers, into
    the activations' dtype, and multiplied on the tensor cores (each half against the columns
    of x it holds)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n[:, None, None]
    n_ok = n3 < N
    pr = tl.arange(0, P)[None, :, None]
    l3 = tl.arange(0, L)[None, None, :]
    pieces = K // (L * HALVES)
    ty = x_ptr.dtype.element_ty
    rows = x_ptr + m[:, None].to(tl.int64) * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for p0 in range(0, pieces, P):
        p3 = p0 + pr
        p_ok = p3 < pieces
        q_lo, q_hi, a_lo, b_lo, a_hi, b_hi, off_lo, off_hi = _decode(
            qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, n3, p3, l3, n_ok & p_ok, n_ok & p_ok, K, QT)
        x_ok = (m[:, None] < M) & tl.reshape(p_ok & (l3 < L), [1, P * L])
        w = tl.reshape((a_lo * q_lo + b_lo).to(ty), [BLOCK_N, P * L])
        x = tl.load(rows + tl.reshape(off_lo, [1, P * L]), mask=x_ok, other=0.0)
        acc = _dot(x, w, acc, IEEE)
        if HALVES == 2:
            w = tl.reshape((a_hi * q_hi + b_hi).to(ty), [BLOCK_N, P * L])
            x = tl.load(rows + tl.reshape(off_hi, [1, P * L]), mask=x_ok, other=0.0)
            acc = _dot(x, w, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * stride_out + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 activations: exact products (tests, and a float32 engine)
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _dequant_kernel(qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, out_ptr, N, K, QT: tl.constexpr,
                    L: tl.constexpr, HALVES: tl.constexpr, BLOCK_N: tl.constexpr,
                    P: tl.constexpr):
    """out [N, K] = the weight, in out's dtype."""
    n3 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]
    p3 = (tl.program_id(1) * P + tl.arange(0, P))[None, :, None]
    l3 = tl.arange(0, L)[None, None, :]
    ok = (n3 < N) & (p3 < K // (L * HALVES))
    q_lo, q_hi, a_lo, b_lo, a_hi, b_hi, off_lo, off_hi = _decode(
        qs_ptr, qh_ptr, sc_ptr, d_ptr, m_ptr, n3, p3, l3, ok, ok, K, QT)
    rows = out_ptr + n3.to(tl.int64) * K
    ty = out_ptr.dtype.element_ty
    tl.store(rows + off_lo, (a_lo * q_lo + b_lo).to(ty), mask=ok)
    if HALVES == 2:
        tl.store(rows + off_hi, (a_hi * q_hi + b_hi).to(ty), mask=ok)


def _args(p: GgufPlanes) -> list[torch.Tensor]:
    """The kernels' five plane pointers; a plane the type lacks is given as qs (never read)."""
    return [p.qs, p.qh if p.qh is not None else p.qs, p.scales if p.scales is not None else p.qs,
            p.d, p.m if p.m is not None else p.d]


def gguf_gemv(x: torch.Tensor, p: GgufPlanes, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None, block_n: int = GEMV_BLOCK_N,
              pieces: int | None = None) -> torch.Tensor:
    """x [M <= MAX_ROWS, cols] @ the weight [rows, cols].T (+ bias) -> [M, rows]; out: a view
    [M, rows] to write into (its rows may be spaced, e.g. a slice of a wider output)."""
    m, k = x.shape
    if k != p.cols:
        raise ValueError(f"x has {k} columns, the {p.qtype} weight {p.cols}")
    lanes, halves = PIECES[p.qtype]
    pieces = pieces or GEMV_SPAN // (lanes * halves)
    m_pad = triton.next_power_of_2(m)
    out = torch.empty(m, p.rows, dtype=x.dtype, device=x.device) if out is None else out
    _gemv_kernel[(triton.cdiv(p.rows, block_n),)](
        x, *_args(p), bias if bias is not None else x, out, m, p.rows, k, x.stride(0),
        out.stride(0), QT=QTYPES[p.qtype], L=lanes, HALVES=halves, M_PAD=m_pad,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, P=max(pieces, m_pad))
    return out


def gguf_dequantize(p: GgufPlanes, dtype: torch.dtype, block_n: int = 32,
                    pieces: int = 8) -> torch.Tensor:
    """The weight [rows, cols] in dtype."""
    lanes, halves = PIECES[p.qtype]
    out = torch.empty(p.rows, p.cols, dtype=dtype, device=p.qs.device)
    grid = (triton.cdiv(p.rows, block_n), triton.cdiv(p.cols // (lanes * halves), pieces))
    _dequant_kernel[grid](*_args(p), out, p.rows, p.cols, QT=QTYPES[p.qtype], L=lanes,
                          HALVES=halves, BLOCK_N=block_n, P=pieces)
    return out


def gguf_gemm(x: torch.Tensor, p: GgufPlanes, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
              span: int = 64) -> torch.Tensor:
    """x [M, cols] @ the weight.T (+ bias), the weight dequantized tile by tile in registers."""
    m, k = x.shape
    lanes, halves = PIECES[p.qtype]
    out = torch.empty(m, p.rows, dtype=x.dtype, device=x.device) if out is None else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(p.rows, block_n))
    _gemm_kernel[grid](
        x, *_args(p), bias if bias is not None else x, out, m, p.rows, k, x.stride(0),
        out.stride(0), QT=QTYPES[p.qtype], L=lanes, HALVES=halves, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, P=max(1, span // (lanes * halves)),
        IEEE=x.dtype == torch.float32)
    return out


def gguf_linear(x: torch.Tensor, p: GgufPlanes, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMV for decode rows, the dequantize-in-tile GEMM up to TILE_MAX_ROWS rows, then
    dequantize + cuBLAS (a large step's matmul outweighs writing the 16-bit weight once).
    out: a [M, rows] view to write into (e.g. a merged layer's columns)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    if x.shape[0] <= MAX_ROWS:
        res = gguf_gemv(x, p, bias, out)
    elif x.shape[0] <= TILE_MAX_ROWS and (x.dtype != torch.float32 or not x.is_cuda):
        # (float32 activations on CUDA: its tiles spill without tensor cores; cuBLAS does it)
        res = gguf_gemm(x, p, bias, out)
    else:
        res = F.linear(x, gguf_dequantize(p, x.dtype), bias)
        res = res if out is None else out.copy_(res)
    return res.reshape(*shape[:-1], p.rows)
