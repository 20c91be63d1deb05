"""Quantized linears on the GPU; references in kernels/reference_quant.py.

Decode (M <= MAX_ROWS rows) is a read of the packed weight, so the GEMVs are shaped like the bf16
ones (kernels/triton_gemv.py): enough programs to keep every SM's share of the bandwidth in
flight, wide coalesced loads, the x tile loaded once per K tile and shared by every column.

- `int4_gemv`: 4-bit GPTQ-layout words [K/8, N] (N contiguous) with a scale and zero per group.
  A program owns BLOCK_N columns and one of SPLIT_K ranges of K. Each word is loaded once, in a
  [BLOCK_K/8, BLOCK_N] tile of 16-byte column vectors, and its 8 nibbles unpacked in registers:
  for one row in the tile's own 2-D layout (`_int4_one_row`), for several through a 3-D
  [BLOCK_K/8, 8, BLOCK_N] unpack into a tensor-core dot (`_int4_tile`). A nibble becomes a
  float by its bits (or-ed into 2^23's: no int-to-float conversion, which runs at a quarter of
  the FMA rate), and (2^23 + q) - (2^23 + zero) is q - zero exactly. Where the tile lies in
  one group, its scale multiplies the tile's partial sums, not each weight. Splits write fp32
  partials; the last to arrive at its columns' ticket adds them (one launch).
- `scaled_gemv`: int8 or FP8 rows [N, K] (K contiguous) with a scale per output channel,
  applied once per output. A program owns BLOCK_N rows; one row's products are summed once,
  after the loop.

Both carry the bf16 decode GEMV's fusions (kernels/triton_gemv.py), so that a quantized decode
layer launches what a bf16 one does: an RMSNorm prologue (its scale from the sums of squares the
producer left in parts, or a pass over x), silu(gate) * up of a merged [gate | up] weight (a
program's columns: half gates, then the matching ups), the residual add, and the output's sums of
squares for the next norm; each rounded to the model dtype where kernels/reference.py rounds. In
a split launch the epilogue runs once, in the last range to arrive, on the whole sum. The 4-bit
GEMV reads an act-order layer's input in its order itself (no gather).

Both launch with programmatic dependent launch (kernels.pdl): the first weight tile streams in
while the kernel before drains; everything an earlier kernel writes is read after gdc_wait.

Larger steps dequantize the 4-bit weight to 16 bits (`int4_dequantize`), then cuBLAS multiplies.
Each kernel has an FMA form (a few rows: the products summed on the CUDA cores) and a tensor-core
form (USE_DOT: rows padded to 16 by Triton). Tiles come from `int4_config` / `scaled_config`,
per device (tuning.GpuTraits), or from the caller (benchmarks/quant_gemv_sweep.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tuili.kernels import arrival_counters, pdl
from tuili.kernels.tuning import GpuTraits, gpu_traits

MAX_ROWS = 8
MAGIC = tl.constexpr(8388608.0)  # 2^23: a float whose low mantissa bits are an added integer
MAX_TICKETS = 4096  # column tiles a split launch may have (one arrival counter each)
ONE_GROUP = 1 << 30  # the group size a per-channel weight is launched with


@dataclass(frozen=True)
class QuantGemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1  # ranges of K, each its own program (int4 only)
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # tensor-core dot (rows padded to 16), else FMA
    prefetch: bool = False  # int4, one row: load the next K tile before summing this one
    int8_bits: bool = True  # int8, one row: weights to floats by their bits, not a conversion


@triton.jit
def _columns(pid, N_OUT, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """A program's weight columns (int4) or rows (int8/FP8) and their mask: BLOCK_N outputs, or
    for a merged [gate | up] weight BLOCK_N / 2 gate columns then the matching up ones, N_OUT
    further on (two runs of consecutive columns: the loads stay vectorised)."""
    i = tl.arange(0, BLOCK_N)
    if GATED:
        o = pid * (BLOCK_N // 2) + i % (BLOCK_N // 2)
        n = o + (i // (BLOCK_N // 2)) * N_OUT
    else:
        o = pid * BLOCK_N + i
        n = o
    return n, o < N_OUT


@triton.jit
def _norm_rstd(x_ptr, stride_x, m, m_mask, sumsq_ptr, SUMSQ_PARTS, norm_k, eps,
               HAS_NORM: tl.constexpr, SUMSQ_IN: tl.constexpr, PARTS_BLOCK: tl.constexpr,
               NORM_BLOCK: tl.constexpr, M_PAD: tl.constexpr):
    """Each row's 1 / rms of x (its norm_k channels) for the RMSNorm prologue: from the sums of
    squares the producer left in parts (SUMSQ_IN), else from a pass over x."""
    rstd = tl.zeros([M_PAD], tl.float32)
    if HAS_NORM and SUMSQ_IN:
        p = tl.arange(0, PARTS_BLOCK)
        parts = tl.load(sumsq_ptr + m[:, None] * SUMSQ_PARTS + p[None, :],
                        mask=m_mask[:, None] & (p < SUMSQ_PARTS)[None, :], other=0.0)
        rstd = tl.rsqrt(tl.sum(parts, axis=1) / norm_k + eps)
    elif HAS_NORM:
        kn = tl.arange(0, NORM_BLOCK)
        squares = tl.zeros([M_PAD, NORM_BLOCK], tl.float32)
        for k0 in range(0, norm_k, NORM_BLOCK):
            v = tl.load(x_ptr + m[:, None] * stride_x + (k0 + kn)[None, :],
                        mask=m_mask[:, None] & (k0 + kn < norm_k)[None, :], other=0.0)
            squares += v.to(tl.float32) * v.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / norm_k + eps)
    return rstd


@triton.jit
def _load_x(x_ptr, row_off, idx, k_mask, m_mask, nw_ptr, rstd, perm_ptr, k_x,
            HAS_NORM: tl.constexpr, HAS_PERM: tl.constexpr):
    """x's channels idx (row_off, m_mask and rstd broadcast against them): the layer's input
    channel perm[idx] where HAS_PERM (act-order's order; k_x, past x's end, is padding: a zero),
    RMS-normalised where HAS_NORM, rounded as reference.rms_norm rounds."""
    if HAS_PERM:
        src = tl.load(perm_ptr + idx, mask=k_mask, other=0)
        k_mask = k_mask & (src < k_x)
    else:
        src = idx
    xv = tl.load(x_ptr + row_off + src, mask=m_mask & k_mask, other=0.0)
    if HAS_NORM:
        nw = tl.load(nw_ptr + src, mask=k_mask, other=0.0)
        h = (xv.to(tl.float32) * rstd).to(xv.dtype)
        xv = (nw.to(tl.float32) * h.to(tl.float32)).to(xv.dtype)
    return xv


@triton.jit
def _epilogue(y, m, m_mask, pid, out_ptr, res_ptr, stride_r, sumsq_out_ptr, N_OUT,
              GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUMSQ_OUT: tl.constexpr,
              M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """y [M_PAD, BLOCK_N] float32 (_columns' order, bias added) rounded to out's dtype; if GATED
    silu(gate) * up, + residual, each rounded where reference.silu_and_mul and a separate add
    round (as triton_gemv's epilogues); stored, and with SUMSQ_OUT this program's part of each
    row's sum of squares (for the next RMSNorm)."""
    dtype = out_ptr.dtype.element_ty
    y = y.to(dtype)
    if GATED:
        o = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        gate, up = tl.split(tl.permute(tl.reshape(y, [M_PAD, 2, BLOCK_N // 2]), (0, 2, 1)))
        g = gate.to(tl.float32)
        act = tl.fdiv(g, 1.0 + tl.exp(-g)).to(dtype)  # 2 ulp of float32 vanish in the rounding
        y = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
    else:
        o = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (o < N_OUT)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + m[:, None] * stride_r + o[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(out_ptr + m[:, None] * N_OUT + o[None, :], y, mask=mask)
    if SUMSQ_OUT:
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_out_ptr + m * tl.num_programs(0) + pid, tl.sum(yf * yf, axis=1),
                 mask=m_mask)


@triton.jit
def _int4_tile(qw_ptr, s_ptr, z_ptr, rows, row_mask, j, n, n_mask, N, k0,
               GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr):
    """Word rows `rows` of columns n unpacked for the several-row forms: (d [KW, 8, BLOCK_N]
    float32, s): the weight is d * s, s [BLOCK_N] (TILE_IN_GROUP: the tile's one group; d is
    then q - zero, exact in 16 bits for the dot) or 1 (d already scaled)."""
    mask = row_mask[:, None] & n_mask[None, :]
    words = tl.load(qw_ptr + rows[:, None] * N + n[None, :], mask=mask, other=0)
    bits = ((words[:, None, :] >> (j * 4)[None, :, None]) & 0xF) | 0x4B000000
    q = bits.to(tl.float32, bitcast=True)  # 2^23 + nibble
    if TILE_IN_GROUP:
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + n, mask=n_mask, other=0.0).to(tl.float32)
        d = q - (z + MAGIC)[None, None, :]
    elif GROUP % 8 == 0:  # the 8 rows of a word share a group: a scale per word row
        g = rows * 8 // GROUP
        s2 = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        z2 = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        d = (q - (z2 + MAGIC)[:, None, :]) * s2[:, None, :]
        s = 1.0
    else:  # groups of any length (act-order's padded runs): a scale per row
        g = (rows[:, None] * 8 + j[None, :]) // GROUP
        sz = g[:, :, None] * N + n[None, None, :]
        m3 = mask[:, None, :]
        s3 = tl.load(s_ptr + sz, mask=m3, other=0.0).to(tl.float32)
        z3 = tl.load(z_ptr + sz, mask=m3, other=0.0).to(tl.float32)
        d = (q - (z3 + MAGIC)) * s3
        s = 1.0
    return d, s


@triton.jit
def _int4_row_load(qw_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N, k0,
                   GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr):
    """Word rows `rows` of columns n ([KW, BLOCK_N], each thread's 16-byte vectors of columns)
    and their scales and zeros, [KW, BLOCK_N] (one per word row: a group a multiple of 8), or
    none here (groups of any length: _int4_one_row loads one per row). Rows past K (a
    prefetch past the range) load nothing."""
    mask = row_mask[:, None] & n_mask[None, :]
    words = tl.load(qw_ptr + rows[:, None] * N + n[None, :], mask=mask, other=0)
    if TILE_IN_GROUP:
        # The tile's one row of scales, loaded for every word row: [KW, BLOCK_N] in the words'
        # own layout (each thread's repeats hit L1). Loaded [BLOCK_N], it would reach that
        # layout through shared memory and a barrier each tile.
        sz = (k0 // GROUP) * N + rows[:, None] * 0 + n[None, :]
        s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    elif GROUP % 8 == 0:  # the 8 rows of a word share a group: a scale per word row
        g = rows * 8 // GROUP
        s = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        s = 1.0
        z = 0.0
    return words, s, z


@triton.jit
def _int4_one_row(words, s, z, x_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N, magic_bits,
                  m_mask, nw_ptr, rstd, perm_ptr, k_x,
                  GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, KW: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr, HAS_PERM: tl.constexpr):
    """One row of x times the words of word rows `rows`: [KW, BLOCK_N] float32 products, summed
    over each word's 8 rows. All 2-D in the words' own layout (each thread's x values serve
    every column it holds): no layout conversion.

    Nibble j is masked in place, q * 16^j (j < 5, < 2^23; nibbles 5..7 after one shift by 20),
    or-ed into 2^23's bits, less 2^23: q * 16^j, exact, and x is scaled by 16^-j (exact). One
    integer op a nibble (a LOP3 of the word, the mask and magic_bits = 0x4B000000, passed at
    run time: with both constants immediate, ptxas takes two), a subtraction and an FMA; the
    zero point comes off once a column and word row: sum(x * (q - z)) = sum(x * q) - z * sum(x)."""
    high = words >> 20  # nibbles 5, 6, 7 at 0, 4, 8
    part = tl.zeros([KW, BLOCK_N], tl.float32)
    x_sum = tl.zeros([KW], tl.float32)  # each word row's x: its zero's share, once a column
    for j in tl.static_range(8):
        at = j if j < 5 else j - 5  # the nibble's place in words (j < 5) or in high
        xj = _load_x(x_ptr, 0, rows * 8 + j, row_mask, m_mask, nw_ptr, rstd, perm_ptr, k_x,
                     HAS_NORM, HAS_PERM).to(tl.float32)
        x_sum += xj
        xj = (xj * (1.0 / (1 << (4 * at))))[:, None]
        src = words if j < 5 else high
        q = ((src & (0xF << (4 * at))) | magic_bits).to(tl.float32, bitcast=True) - MAGIC
        if TILE_IN_GROUP or GROUP % 8 == 0:
            part += xj * q  # q * 16^j, exact
        else:  # groups of any length (act-order's runs): a scale and zero per row
            mask = row_mask[:, None] & n_mask[None, :]
            sz = ((rows * 8 + j) // GROUP)[:, None] * N + n[None, :]
            sj = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            zj = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            part += xj * ((q - zj * (1 << (4 * at))) * sj)
    if TILE_IN_GROUP or GROUP % 8 == 0:
        part = (part - z * x_sum[:, None]) * s
    return part


@triton.jit
def _int4_dot_nibbles(acc, words, s, z, x_ptr, x_off, m_mask, s_ptr, z_ptr, rows, row_mask, n,
                      n_mask, N, k0, magic_bits, nw_ptr, rstd, perm_ptr, k_x,
                      GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, HAS_NORM: tl.constexpr,
                      HAS_PERM: tl.constexpr):
    """acc [M_PAD, BLOCK_N] plus several rows of x times one tile of words, a tensor-core dot for
    each nibble j: x's columns 8r + j (scaled by 16^-j, exact) times [KW, BLOCK_N] weights
    unpacked in the words' own layout as in _int4_one_row. In one group, (q - zero) * 16^j is
    exact in 16 bits and the scale multiplies the tile's sum; else (q - zero) * 16^j * scale is
    rounded to x's dtype (dequantize-then-matmul's rounding: a power of 2 does not change it)."""
    high = words >> 20  # nibbles 5, 6, 7 at 0, 4, 8
    tile = tl.zeros_like(acc)
    for j in tl.static_range(8):
        at = j if j < 5 else j - 5
        xj = _load_x(x_ptr, x_off[:, None], (rows * 8 + j)[None, :], row_mask[None, :],
                     m_mask[:, None], nw_ptr, rstd[:, None], perm_ptr, k_x, HAS_NORM, HAS_PERM)
        xj = (xj.to(tl.float32) * (1.0 / (1 << (4 * at)))).to(xj.dtype)
        src = words if j < 5 else high
        q = ((src & (0xF << (4 * at))) | magic_bits).to(tl.float32, bitcast=True)
        if TILE_IN_GROUP:  # 2^23 + q * 16^j less 2^23 + zero * 16^j: exact
            w = q - (z * (1 << (4 * at)) + MAGIC)
        elif GROUP % 8 == 0:
            w = (q - (z * (1 << (4 * at)) + MAGIC)) * s
        else:  # groups of any length (act-order's runs): a scale and zero per row
            mask = row_mask[:, None] & n_mask[None, :]
            sz = ((rows * 8 + j) // GROUP)[:, None] * N + n[None, :]
            sj = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            zj = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            w = (q - (zj * (1 << (4 * at)) + MAGIC)) * sj
        tile = tl.dot(xj, w.to(xj.dtype), tile)
    if TILE_IN_GROUP:
        scale = tl.load(s_ptr + (k0 // GROUP) * N + n, mask=n_mask, other=0.0).to(tl.float32)
        tile = tile * scale[None, :]
    return acc + tile


@triton.jit
def _int4_rows(acc, x_ptr, x_off, m_mask, qw_ptr, s_ptr, z_ptr, rows, row_mask, r, j, n, n_mask,
               N, k0, k_hi, nw_ptr, rstd, perm_ptr, k_x, GROUP: tl.constexpr,
               TILE_IN_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_DOT: tl.constexpr, HAS_NORM: tl.constexpr, HAS_PERM: tl.constexpr):
    """acc plus several rows of x times one tile: a tensor-core dot (acc [M_PAD, BLOCK_N]) or
    FMA products summed over each word's rows (acc [M_PAD, KW, BLOCK_N])."""
    d, s = _int4_tile(qw_ptr, s_ptr, z_ptr, rows, row_mask, j, n, n_mask, N, k0, GROUP,
                      TILE_IN_GROUP)
    if USE_DOT:
        kk = k0 + tl.arange(0, BLOCK_K)
        xv = _load_x(x_ptr, x_off[:, None], kk[None, :], (kk < k_hi)[None, :], m_mask[:, None],
                     nw_ptr, rstd[:, None], perm_ptr, k_x, HAS_NORM, HAS_PERM)
        w = tl.reshape(d, [BLOCK_K, BLOCK_N]).to(xv.dtype)
        if TILE_IN_GROUP:
            acc += tl.dot(xv, w) * s[None, :]
        else:
            acc += tl.dot(xv, w)
    else:
        kk = k0 + r[:, None] * 8 + j[None, :]  # [KW, 8]: row 8r + j of the tile
        xv = _load_x(x_ptr, x_off[:, None, None], kk[None, :, :], (kk < k_hi)[None, :, :],
                     m_mask[:, None, None], nw_ptr, rstd[:, None, None], perm_ptr, k_x,
                     HAS_NORM, HAS_PERM)
        part = tl.sum(xv.to(tl.float32)[:, :, :, None] * d[None, :, :, :], axis=2)
        if TILE_IN_GROUP:
            acc += part * s[None, None, :]
        else:
            acc += part
    return acc


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, part_ptr, ticket_ptr, out_ptr,
                      res_ptr, norm_w_ptr, sumsq_ptr, sumsq_out_ptr, perm_ptr,
                      M, N, N_OUT, K, stride_x, stride_r, K_SPLIT, SPLITS, magic_bits, k_x, eps,
                      SUMSQ_PARTS, GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                      PREFETCH: tl.constexpr, PDL: tl.constexpr, HAS_NORM: tl.constexpr,
                      SUMSQ_IN: tl.constexpr, PARTS_BLOCK: tl.constexpr,
                      NORM_BLOCK: tl.constexpr, GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      SUMSQ_OUT: tl.constexpr, HAS_PERM: tl.constexpr,
                      NIBBLE_DOTS: tl.constexpr):
    KW: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n, n_mask = _columns(pid_n, N_OUT, BLOCK_N, GATED)  # N: the weight's columns
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    r = tl.arange(0, KW)
    j = tl.arange(0, 8)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)  # K and K_SPLIT are multiples of 8
    x_off = m * stride_x
    if USE_DOT:
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    elif M_PAD == 1:
        acc = tl.zeros([KW, BLOCK_N], tl.float32)
    else:  # per word row: summed across threads once, after the loop
        acc = tl.zeros([M_PAD, KW, BLOCK_N], tl.float32)
    one_row: tl.constexpr = M_PAD == 1 and not USE_DOT
    if one_row and PREFETCH:  # the next tile's loads are in flight while this one's are summed
        rows = k_lo // 8 + r
        words, s, z = _int4_row_load(qw_ptr, s_ptr, z_ptr, rows, rows < k_hi // 8, n, n_mask,
                                     N, k_lo, GROUP, TILE_IN_GROUP)
    # Programmatic dependent launch (kernels.pdl): weights depend on no earlier kernel, x, the
    # sums of squares, the residual, the parts and the tickets do: the wait comes after the
    # first tile's words (prefetch), before anything else.
    if PDL:
        gdc_wait()
    # The norm's scale over the whole of x's row, in every split (as the bf16 GEMV's programs).
    rstd = _norm_rstd(x_ptr, stride_x, m, m_mask, sumsq_ptr, SUMSQ_PARTS, k_x, eps, HAS_NORM,
                      SUMSQ_IN, PARTS_BLOCK, NORM_BLOCK, M_PAD)
    # One row's as a scalar: broadcast from a [1] tensor, it doubled the registers (sm_90).
    rstd_one = tl.sum(rstd)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 // 8 + r
        row_mask = rows < k_hi // 8
        if one_row and PREFETCH:
            nxt = _int4_row_load(qw_ptr, s_ptr, z_ptr, rows + KW, rows + KW < k_hi // 8, n,
                                 n_mask, N, k0 + BLOCK_K, GROUP, TILE_IN_GROUP)
            acc += _int4_one_row(words, s, z, x_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N,
                                 magic_bits, m_mask, norm_w_ptr, rstd_one, perm_ptr, k_x, GROUP,
                                 TILE_IN_GROUP, KW, BLOCK_N, HAS_NORM, HAS_PERM)
            words, s, z = nxt
        elif one_row:
            words, s, z = _int4_row_load(qw_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N, k0,
                                         GROUP, TILE_IN_GROUP)
            acc += _int4_one_row(words, s, z, x_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N,
                                 magic_bits, m_mask, norm_w_ptr, rstd_one, perm_ptr, k_x, GROUP,
                                 TILE_IN_GROUP, KW, BLOCK_N, HAS_NORM, HAS_PERM)
        elif USE_DOT and KW >= 16 and NIBBLE_DOTS:  # a dot a nibble: K is the word rows
            words, s, z = _int4_row_load(qw_ptr, s_ptr, z_ptr, rows, row_mask, n, n_mask, N, k0,
                                         GROUP, TILE_IN_GROUP)
            acc = _int4_dot_nibbles(acc, words, s, z, x_ptr, x_off, m_mask, s_ptr, z_ptr, rows,
                                    row_mask, n, n_mask, N, k0, magic_bits, norm_w_ptr, rstd,
                                    perm_ptr, k_x, GROUP, TILE_IN_GROUP, HAS_NORM, HAS_PERM)
        else:
            acc = _int4_rows(acc, x_ptr, x_off, m_mask, qw_ptr, s_ptr, z_ptr, rows, row_mask, r,
                             j, n, n_mask, N, k0, k_hi, norm_w_ptr, rstd, perm_ptr, k_x, GROUP,
                             TILE_IN_GROUP, BLOCK_K, BLOCK_N, USE_DOT, HAS_NORM, HAS_PERM)
    if PDL:  # the next kernel may start loading its weights; it waits for this one's outputs
        gdc_launch_dependents()
    if USE_DOT:
        y = acc
    elif M_PAD == 1:
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = tl.sum(acc, axis=1)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(part_ptr + (pid_k * M + m)[:, None] * N + n[None, :], y, mask=mask)
        # The split that arrives last adds the parts and alone runs the epilogue, on the whole
        # sum: every thread's stores above come before the release of the ticket (barrier,
        # then an acq_rel add); it leaves the ticket at 0 for the next launch (or graph replay).
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            y = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            for p in range(0, SPLITS):  # from L2 (.cg): other SMs wrote them
                y += tl.load(part_ptr + (p * M + m)[:, None] * N + n[None, :], mask=mask,
                             other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            _epilogue(y, m, m_mask, pid_n, out_ptr, res_ptr, stride_r, sumsq_out_ptr, N_OUT,
                      GATED, HAS_RESIDUAL, SUMSQ_OUT, M_PAD, BLOCK_N)
            tl.store(ticket_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        _epilogue(y, m, m_mask, pid_n, out_ptr, res_ptr, stride_r, sumsq_out_ptr, N_OUT,
                  GATED, HAS_RESIDUAL, SUMSQ_OUT, M_PAD, BLOCK_N)


@triton.jit
def _weights_f32(w, INT8_BITS: tl.constexpr):
    """int8 or FP8 weights as float32; int8 by its bits where INT8_BITS: w + 128 + 0x4B000000
    (an integer add) is the float 2^23 + 128 + w. The int-to-float conversion runs on a unit of
    16 lanes an SM a clock: at most ~4.2 TB/s of int8 on an H200's 132 SMs, below its peak."""
    if INT8_BITS and w.dtype == tl.int8:
        bits = w.to(tl.int32) + 0x4B000080
        return bits.to(tl.float32, bitcast=True) - (MAGIC + 128.0)
    return w.to(tl.float32)


@triton.jit
def _scaled_tile(w, x_ptr, x_off, kk, m_mask, K, nw_ptr, rstd, M_PAD: tl.constexpr,
                 USE_DOT: tl.constexpr, INT8_BITS: tl.constexpr, HAS_NORM: tl.constexpr):
    """One K tile's products with its weights w: dot [BLOCK_N, M_PAD]; one row, unsummed
    [BLOCK_N, BLOCK_K] (summed across threads once, after the loop); several rows
    [M_PAD, BLOCK_N]."""
    xv = _load_x(x_ptr, x_off, kk[None, :], (kk < K)[None, :], m_mask[:, None], nw_ptr, rstd,
                 x_ptr, K, HAS_NORM, False)
    if USE_DOT:
        out = tl.dot(w.to(xv.dtype), tl.trans(xv))
    elif M_PAD == 1:
        out = xv.to(tl.float32) * _weights_f32(w, INT8_BITS)
    else:
        out = tl.sum(xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return out


@triton.jit
def _scaled_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, res_ptr, norm_w_ptr,
                        sumsq_ptr, sumsq_out_ptr, M, N_OUT, K, stride_x, stride_r, eps,
                        SUMSQ_PARTS, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                        PDL: tl.constexpr, INT8_BITS: tl.constexpr, HAS_NORM: tl.constexpr,
                        SUMSQ_IN: tl.constexpr, PARTS_BLOCK: tl.constexpr,
                        NORM_BLOCK: tl.constexpr, GATED: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, SUMSQ_OUT: tl.constexpr):
    pid = tl.program_id(0)
    n, n_mask = _columns(pid, N_OUT, BLOCK_N, GATED)  # the weight's rows
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    x_off = m[:, None] * stride_x
    # The first tile's products start the sum, so that the sum keeps their layout (started
    # from zeros, it took x's, and each tile's products went through shared memory).
    # The weights' offsets read as runs of 8 (the same values): loaded 8 bytes a thread, as x's
    # 8 bf16, the two tiles share one layout (16 bytes of weights beside 8 x values, the
    # compiler moves one of them through shared memory each tile).
    kw = (k // 8) * 8 + k % 8
    w = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)
    if PDL:  # the first weight tile depends on no earlier kernel: it streams in before the wait
        gdc_wait()
    rstd = _norm_rstd(x_ptr, stride_x, m, m_mask, sumsq_ptr, SUMSQ_PARTS, K, eps, HAS_NORM,
                      SUMSQ_IN, PARTS_BLOCK, NORM_BLOCK, M_PAD)
    rstd = rstd[:, None]
    if M_PAD == 1:  # a scalar: broadcast from a [1, 1] tensor, it takes more registers (sm_90)
        rstd = tl.sum(tl.sum(rstd, axis=1), axis=0)
    acc = _scaled_tile(w, x_ptr, x_off, k, m_mask, K, norm_w_ptr, rstd, M_PAD, USE_DOT,
                       INT8_BITS, HAS_NORM)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_rows + (k0 + kw)[None, :], mask=n_mask[:, None] & (k0 + k < K)[None, :],
                    other=0.0)
        acc += _scaled_tile(w, x_ptr, x_off, k0 + k, m_mask, K, norm_w_ptr, rstd, M_PAD,
                            USE_DOT, INT8_BITS, HAS_NORM)
    if PDL:
        gdc_launch_dependents()
    if USE_DOT:
        acc = tl.trans(acc)
    elif M_PAD == 1:
        acc = tl.sum(acc, axis=1)[None, :]
    acc *= tl.load(scale_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _epilogue(acc, m, m_mask, pid, out_ptr, res_ptr, stride_r, sumsq_out_ptr, N_OUT, GATED,
              HAS_RESIDUAL, SUMSQ_OUT, M_PAD, BLOCK_N)


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


# Launch shapes. Decode reads each weight once, so what counts is the bytes each SM keeps in
# flight: its share of the bandwidth times the memory latency (~1 us under load). First
# guesses from the compiled kernels' resources (sm_90, scripts/compile_kernels.py), not yet
# measured: benchmarks/quant_gemv_sweep.py times the others beside them.
LATENCY_S = 1e-6
REGISTERS_PER_SM = 65536
# One-row 4-bit tiles, preferred first: (columns, K tile, warps, prefetch, registers a thread,
# sm_90, rounded up to the allocation's 8). 128 x 128 holds 8 KB of words a program, 7
# programs an SM; 128 x 64 with the next tile in flight 2 x 4 KB, 8 programs an SM.
INT4_ROW_TILES = ((128, 128, 4, False, 72), (128, 64, 4, True, 64))
INT4_DOT_RESIDENT = 2  # the several-row tiles: 184 registers a thread (sm_90)


def int4_config(m: int, n: int, k: int, group: int,
                gpu: GpuTraits | None = None) -> QuantGemvConfig:
    """Tiles of the 4-bit GEMV for m rows of [m, k] x [n, k]^T on `gpu` (default: the current
    device's traits): the first one-row tile whose resident programs hold the SM's bytes in
    flight (bandwidth per SM x latency: 25 KB on an H100, 36 KB on an H200; 128 x 128 holds 56
    KB), a K tile inside one group where one divides it, and K split so that the programs fill
    every SM's resident slots once (one wave: no tail). Rows > 1: tensor-core tiles."""
    gpu = gpu or gpu_traits()
    group = k if group <= 0 else group
    if m > 1:
        block_n, block_k, warps, prefetch = 64 if n < 2048 else 128, 128, 4, False
        resident = INT4_DOT_RESIDENT
    else:
        for block_n, block_k, warps, prefetch, regs in INT4_ROW_TILES:
            resident = REGISTERS_PER_SM // (regs * 32 * warps)
            held = resident * block_k // 2 * block_n * (2 if prefetch else 1)
            if held >= gpu.bandwidth_per_sm * LATENCY_S:
                break
    while block_k > 32 and group % block_k and group < k:  # a tile inside one group
        block_k //= 2
    columns = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(k, block_k), round(gpu.sms * resident / columns)))
    return QuantGemvConfig(block_n, block_k, split, num_warps=warps, use_dot=m > 1,
                           prefetch=prefetch)


def scaled_config(m: int, n: int, k: int, gpu: GpuTraits | None = None) -> QuantGemvConfig:
    """Tiles of the int8/FP8 GEMV, from the bf16 GEMV's measured ones (triton_gemv
    .default_config) at half the bytes a weight: a whole row of up to 8192 per tile (all its
    loads issued at once), 8 warps, 2 rows a program (80 registers: 3 programs an SM; 4 rows
    take 128); 2048-long tiles for long reductions, where a fast-memory GPU (H200) takes 4 rows
    and 8 warps a program for more bytes in flight. Rows > 2: tensor-core tiles."""
    gpu = gpu or gpu_traits()
    if m > 2:
        return QuantGemvConfig(32 if n >= 2 * k else 16, 256, use_dot=True, num_stages=3)
    if k <= 8192:
        return QuantGemvConfig(2, triton.next_power_of_2(k), num_warps=8 if k >= 2048 else 4)
    return QuantGemvConfig(4, 2048, num_warps=8) if gpu.fast_memory else QuantGemvConfig(2, 2048)


def _m_pad(m: int) -> int:
    return triton.next_power_of_2(m)


def _output_tiles(n_out: int, block_n: int, gated: bool) -> int:
    """Programs along the outputs: a gated one's BLOCK_N weight columns (rows) are half gates."""
    if gated and block_n < 2:
        raise ValueError(f"a gated GEMV needs block_n >= 2 (a gate and an up column), got {block_n}")
    return triton.cdiv(n_out, block_n // 2 if gated else block_n)


def _fusions(x: torch.Tensor, m_pad: int, n_out: int, programs: int, out: torch.Tensor,
             residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
             sumsq: torch.Tensor | None, want_sumsq: bool, gated: bool,
             k_x: int) -> tuple[dict, torch.Tensor | None]:
    """The kernels' arguments for the bf16 GEMV's fusions (kernels/triton_gemv.py; `out`
    stands in for each absent tensor), and the output's sums of squares in parts, one a
    program, when want_sumsq."""
    m = x.shape[0]
    if residual is not None and (residual.shape != (m, n_out) or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not fit the output ({m}, {n_out})")
    if norm_weight is not None and norm_weight.shape != (k_x,):
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} does not fit x's {k_x} channels")
    if sumsq is not None and (sumsq.shape[0] != m or sumsq.dtype != torch.float32
                              or not sumsq.is_contiguous()):
        raise ValueError(f"sumsq must be contiguous float32 [{m}, parts], got "
                         f"{tuple(sumsq.shape)} {sumsq.dtype}")
    sumsq_out = (torch.empty(m, programs, dtype=torch.float32, device=x.device) if want_sumsq
                 else None)
    parts = sumsq.shape[1] if sumsq is not None else 1
    args = dict(
        res_ptr=out if residual is None else residual,
        norm_w_ptr=out if norm_weight is None else norm_weight,
        sumsq_ptr=out if sumsq is None else sumsq,
        sumsq_out_ptr=out if sumsq_out is None else sumsq_out,
        stride_r=0 if residual is None else residual.stride(0), eps=eps, SUMSQ_PARTS=parts,
        HAS_NORM=norm_weight is not None, SUMSQ_IN=sumsq is not None,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        NORM_BLOCK=min(triton.next_power_of_2(k_x), 8192 // m_pad), GATED=gated,
        HAS_RESIDUAL=residual is not None, SUMSQ_OUT=want_sumsq)
    return args, sumsq_out


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int, bias: torch.Tensor | None = None,
              config: QuantGemvConfig | None = None, *, residual: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
              sumsq: torch.Tensor | None = None, want_sumsq: bool = False,
              perm: torch.Tensor | None = None):
    """x [M <= MAX_ROWS, K] @ the 4-bit weight's dequantized [N, K].T (+ bias) -> [M, N], with
    triton_gemv.gemv's fusions: rmsnorm(x; norm_weight, eps) first (its scale from `sumsq`, the
    producer's parts, when given); silu(gate) * up of a merged [gate | up] weight if gated
    ([M, N / 2]); + residual; want_sumsq: (out, the output's sums of squares in parts).
    perm: act-order's input order (Int4Method.gathered), read in the kernel. config: tiles,
    int4_config's when None."""
    m, k_x = x.shape
    n, k = qweight.shape[1], qweight.shape[0] * 8
    n_out = n // 2 if gated else n
    if m > MAX_ROWS:
        raise ValueError(f"int4_gemv serves up to {MAX_ROWS} rows, got {m}")
    if (k_x != k) if perm is None else (perm.shape != (k,) or k_x > k):
        raise ValueError(f"x {tuple(x.shape)} does not fit 4-bit words {tuple(qweight.shape)}"
                         + ("" if perm is None else f" and perm {tuple(perm.shape)}"))
    if gated and n % 2:
        raise ValueError(f"a gated weight has an even number of columns, got {n}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or int4_config(m, n, k, group, gpu_traits(x.device))
    if cfg.block_k % 8:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of 8 (a word's rows)")
    # One group (per channel): every tile lies in it, whatever K (one compiled kernel for all).
    group = ONE_GROUP if group >= k else group
    columns = _output_tiles(n_out, cfg.block_n, gated)
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    if columns > MAX_TICKETS:
        splits, k_split = 1, k
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    m_pad = max(16, _m_pad(m)) if cfg.use_dot else _m_pad(m)
    fused, sumsq_out = _fusions(x, m_pad, n_out, columns, out, residual, norm_weight, eps,
                                sumsq, want_sumsq, gated, k_x)
    if m == 0:
        return (out, sumsq_out) if want_sumsq else out
    part = tickets = out
    if splits > 1:
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        tickets = arrival_counters(x.device, "int4_gemv", MAX_TICKETS)
    _int4_gemv_kernel[(columns, splits)](
        x, qweight, scales, zeros, bias if bias is not None else out, part, tickets, out,
        perm_ptr=perm if perm is not None else out, M=m, N=n, N_OUT=n_out, K=k,
        stride_x=x.stride(0), K_SPLIT=k_split, SPLITS=splits, magic_bits=0x4B000000, k_x=k_x,
        GROUP=group, TILE_IN_GROUP=group % cfg.block_k == 0, HAS_BIAS=bias is not None,
        M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=splits > 1,
        USE_DOT=cfg.use_dot, PREFETCH=cfg.prefetch, PDL=pdl(x), HAS_PERM=perm is not None,
        # (q - zero) * 16^j overflows float16 (j = 4: up to 15 * 2^16): its tiles unpack whole.
        NIBBLE_DOTS=x.dtype != torch.float16,
        **fused, launch_pdl=pdl(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (out, sumsq_out) if want_sumsq else out


def scaled_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None,
                config: QuantGemvConfig | None = None, *, residual: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
                sumsq: torch.Tensor | None = None, want_sumsq: bool = False):
    """x [M <= MAX_ROWS, K] @ (weight * scale[:, None]).T (+ bias): int8 or FP8 weight [N, K],
    with int4_gemv's (triton_gemv.gemv's) fusions. config: tiles, scaled_config's when None."""
    m, k = x.shape
    n = weight.shape[0]
    n_out = n // 2 if gated else n
    if m > MAX_ROWS:
        raise ValueError(f"scaled_gemv serves up to {MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if gated and n % 2:
        raise ValueError(f"a gated weight has an even number of rows, got {n}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or scaled_config(m, n, k, gpu_traits(x.device))
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    m_pad = max(16, _m_pad(m)) if cfg.use_dot else _m_pad(m)
    programs = _output_tiles(n_out, cfg.block_n, gated)
    fused, sumsq_out = _fusions(x, m_pad, n_out, programs, out, residual, norm_weight, eps,
                                sumsq, want_sumsq, gated, k)
    if m == 0:
        return (out, sumsq_out) if want_sumsq else out
    _scaled_gemv_kernel[(programs,)](
        x, weight, scale, bias if bias is not None else x, out, M=m, N_OUT=n_out, K=k,
        stride_x=x.stride(0), HAS_BIAS=bias is not None, M_PAD=m_pad, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot, PDL=pdl(x), INT8_BITS=cfg.int8_bits, **fused,
        launch_pdl=pdl(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (out, sumsq_out) if want_sumsq else out


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
