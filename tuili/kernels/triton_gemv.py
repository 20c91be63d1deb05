"""Decode GEMV for a few rows (M <= 8): y = epilogue(prologue(x) @ W^T (+ bias)) in one launch.

The prologue is RMSNorm(x). Its scale comes from x's sum of squares per row, which the GEMV that
wrote x (a residual-add epilogue) leaves behind in parts, one float per program (`want_sumsq`); when
there are none, each program first sums x itself (a few thousand elements, re-read from L2: on a
large weight that pass costs more than a separate norm kernel). The epilogue is silu(gate) * up of a merged [gate | up] weight (each program computes
matching gate and up columns), or + residual, writing the new residual stream. Each step rounds to
the model dtype where kernels/reference.py does, so only the dot's summation order differs from
norm kernel + cuBLAS + SiLU kernel + add. Each program owns BLOCK_N output columns and streams
their weight rows once: the weight read is the whole cost at decode.

"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tuili.kernels import num_sms, pdl
from tuili.kernels.tuning import GpuTraits, gpu_traits

MAX_ROWS = 8
# Programmatic dependent launch (kernels.pdl): a GEMV over a small weight lets the next kernel
# launch as soon as it starts; one over a large weight only after its weight loop (released at
# the start, the next kernel's programs would crowd it off the SMs), unless all its programs are
# resident at once: then the next kernel's programs take only SM room this one leaves free, and
# load their weights while it streams. Each rule was measured in the decode graphs of SmolLM2 and
# Llama-3.1-8B (BENCHMARKS.md, "Measurements behind the code").
EARLY_RELEASE_MAX_WEIGHT = 8 << 20
ONE_WAVE_WARPS_PER_SM = 32  # half an H100 SM's warp slots: room left for the next kernel


@triton.jit
def _accumulate(acc, w, xv, USE_DOT: tl.constexpr):
    # One return: Triton generates the statements after a constexpr-if's return too.
    if USE_DOT:  # acc: [BLOCK_N, M_PAD]
        acc += tl.dot(w, tl.trans(xv))
    else:  # acc: [M_PAD, BLOCK_N]
        acc += tl.sum(xv[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    return acc


@triton.jit
def _x_tile(x_rows, norm_w_ptr, kk, k_mask, m_mask, rstd, HAS_NORM: tl.constexpr):
    """x's columns kk, normalised (rounded as reference.rms_norm) when HAS_NORM."""
    xv = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    if HAS_NORM:
        nw = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0)
        h = (xv.to(tl.float32) * rstd[:, None]).to(xv.dtype)
        xv = (nw[None, :].to(tl.float32) * h.to(tl.float32)).to(xv.dtype)
    return xv


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, norm_w_ptr, sumsq_ptr, sumsq_out_ptr,
                 eps, M, N, K, SUMSQ_PARTS, stride_x, stride_r,
                 HAS_NORM: tl.constexpr, SUMSQ_IN: tl.constexpr, SUMSQ_OUT: tl.constexpr,
                 PARTS_BLOCK: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr, USE_DOT: tl.constexpr,
                 PDL: tl.constexpr, EARLY_RELEASE: tl.constexpr):
    if PDL and EARLY_RELEASE:  # the next kernel may start; it waits for this one's outputs
        gdc_launch_dependents()
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    partner = N  # GATED: the up half of the weight follows the gate half
    n_mask = n < N
    k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m[:, None] * stride_x
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    up_rows = w_rows + partner * K
    # The first weight tile depends on no earlier kernel: it streams in before the wait.
    k_mask = k < K
    w_mask = n_mask[:, None] & k_mask[None, :]
    w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
    if GATED:
        u = tl.load(up_rows + k[None, :], mask=w_mask, other=0.0)
    if PDL:
        gdc_wait()
    rstd = tl.zeros([M_PAD], tl.float32)
    if HAS_NORM and SUMSQ_IN:  # RMSNorm needs each row's 1/rms before the first normalised element
        p = tl.arange(0, PARTS_BLOCK)
        parts = tl.load(sumsq_ptr + m[:, None] * SUMSQ_PARTS + p[None, :],
                        mask=m_mask[:, None] & (p < SUMSQ_PARTS)[None, :], other=0.0)
        rstd = tl.rsqrt(tl.sum(parts, axis=1) / K + eps)
    elif HAS_NORM:
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
    acc_up = tl.zeros_like(acc)
    xv = _x_tile(x_rows, norm_w_ptr, k, k_mask, m_mask, rstd, HAS_NORM)
    acc = _accumulate(acc, w, xv, USE_DOT)
    if GATED:
        acc_up = _accumulate(acc_up, u, xv, USE_DOT)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + k
        k_mask = kk < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        xv = _x_tile(x_rows, norm_w_ptr, kk, k_mask, m_mask, rstd, HAS_NORM)
        acc = _accumulate(acc, tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0), xv, USE_DOT)
        if GATED:
            acc_up = _accumulate(acc_up, tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0),
                                 xv, USE_DOT)
    if PDL and not EARLY_RELEASE:
        gdc_launch_dependents()
    if USE_DOT:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up_bias = tl.load(bias_ptr + partner + n, mask=n_mask, other=0.0)
            acc_up += up_bias.to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GATED:  # silu_and_mul of the rounded projections, rounded as reference.silu_and_mul
        g = y.to(tl.float32)
        # fast division: 2 ulp of float32 vanish in the rounding to 16 bits
        act = tl.fdiv(g, 1.0 + tl.exp(-g)).to(dtype)
        y = (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:  # the residual add, rounded as a separate add would round it
        r = tl.load(res_ptr + m[:, None] * stride_r + n[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(out_ptr + m[:, None] * N + n[None, :], y, mask=mask)
    if SUMSQ_OUT:  # this program's part of each row's sum of squares, for the next RMSNorm
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_out_ptr + m * tl.num_programs(0) + pid, tl.sum(yf * yf, axis=1),
                 mask=m_mask)


@triton.jit
def _gemv_persistent_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, norm_w_ptr, sumsq_ptr,
                            sumsq_out_ptr, eps, M, N, K, SUMSQ_PARTS, stride_x, stride_r,
                            HAS_NORM: tl.constexpr, SUMSQ_IN: tl.constexpr,
                            SUMSQ_OUT: tl.constexpr, PARTS_BLOCK: tl.constexpr,
                            GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, M_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                            PDL: tl.constexpr):
    """_gemv_kernel's work on a grid that is all resident at once: each program takes column
    tiles pid, pid + programs, ... (BLOCK_K covers the whole row, so x is loaded and normalised
    once), the next tile's weight rows loaded before this tile's sum. Being resident, it lets the
    next kernel launch at its start (PDL): that kernel's programs take the SM room this one leaves
    and load their first weights while this one streams, so no kernel boundary drains the
    memory system."""
    if PDL:
        gdc_launch_dependents()
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles = tl.cdiv(N, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    x_rows = x_ptr + m[:, None] * stride_x
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_mask = (n < N)[:, None] & k_mask[None, :]
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=w_mask, other=0.0)
    if GATED:
        u = tl.load(w_ptr + (n[:, None] + N).to(tl.int64) * K + k[None, :], mask=w_mask,
                    other=0.0)
    if PDL:
        gdc_wait()
    rstd = tl.zeros([M_PAD], tl.float32)
    if HAS_NORM and SUMSQ_IN:
        p = tl.arange(0, PARTS_BLOCK)
        parts = tl.load(sumsq_ptr + m[:, None] * SUMSQ_PARTS + p[None, :],
                        mask=m_mask[:, None] & (p < SUMSQ_PARTS)[None, :], other=0.0)
        rstd = tl.rsqrt(tl.sum(parts, axis=1) / K + eps)
    elif HAS_NORM:
        v = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(v * v, axis=1) / K + eps)
    xv = _x_tile(x_rows, norm_w_ptr, k, k_mask, m_mask, rstd, HAS_NORM)
    squares = tl.zeros([M_PAD], tl.float32)
    dtype = out_ptr.dtype.element_ty
    for t in range(pid, tiles, programs):
        # the next tile's rows stream in while this one is summed
        n_next = (t + programs) * BLOCK_N + tl.arange(0, BLOCK_N)
        next_mask = (n_next < N)[:, None] & k_mask[None, :]
        w_next = tl.load(w_ptr + n_next[:, None].to(tl.int64) * K + k[None, :], mask=next_mask,
                         other=0.0)
        if GATED:
            u_next = tl.load(w_ptr + (n_next[:, None] + N).to(tl.int64) * K + k[None, :],
                             mask=next_mask, other=0.0)
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        if USE_DOT:
            acc = tl.trans(_accumulate(tl.zeros([BLOCK_N, M_PAD], tl.float32), w, xv, USE_DOT))
        else:
            acc = _accumulate(tl.zeros([M_PAD, BLOCK_N], tl.float32), w, xv, USE_DOT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dtype)
        if GATED:
            if USE_DOT:
                acc_up = tl.trans(_accumulate(tl.zeros([BLOCK_N, M_PAD], tl.float32), u, xv,
                                              USE_DOT))
            else:
                acc_up = _accumulate(tl.zeros([M_PAD, BLOCK_N], tl.float32), u, xv, USE_DOT)
            if HAS_BIAS:
                up_bias = tl.load(bias_ptr + N + n, mask=n_mask, other=0.0)
                acc_up += up_bias.to(tl.float32)[None, :]
            g = y.to(tl.float32)
            act = tl.fdiv(g, 1.0 + tl.exp(-g)).to(dtype)
            y = (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
            u = u_next
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + m[:, None] * stride_r + n[None, :], mask=mask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(out_ptr + m[:, None] * N + n[None, :], y, mask=mask)
        if SUMSQ_OUT:
            yf = tl.where(mask, y.to(tl.float32), 0.0)
            squares += tl.sum(yf * yf, axis=1)
        w = w_next
    if SUMSQ_OUT:  # this program's part of each row's sum of squares, for the next RMSNorm
        tl.store(sumsq_out_ptr + m * programs + pid, squares, mask=m_mask)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # tensor-core dot (rows padded by Triton), else FMA and a reduction
    early_release: bool | None = None  # PDL: release the next kernel at the start; None: the rule
    # > 0: a resident grid of this many programs per SM, each looping over column tiles
    # (_gemv_persistent_kernel; block_k must cover the whole row), released at its start
    programs_per_sm: int = 0


# _fast_memory_config's answer where cuBLAS (and separate norm / SiLU / add kernels) wins.
CUBLAS = GemvConfig(block_n=0, block_k=0)


def default_config(m: int, n: int, k: int, norm_pass: bool = False, gated: bool = False,
                   gpu: GpuTraits | None = None) -> GemvConfig | None:
    """Tiles for m rows of [m, k] x [n, k]^T (n: output columns; a gated weight has 2n rows) on
    `gpu` (default: the current CUDA device's traits), by shape, measured on an H100 and an H200
    (benchmarks/gemv_sweep.py, scratch sweeps in BENCHMARKS.md); None where cuBLAS with separate
    norm / SiLU kernels is faster. norm_pass: each program sums x's squares itself (a norm
    prologue without the producer's sums)."""
    gpu = gpu or gpu_traits()
    rows = 2 * n if gated else n
    big = rows * k > 8 << 20
    if k <= 1024 and rows >= 32768:
        return None  # a short, wide LM head (SmolLM2's): cuBLAS keeps more bytes in flight
    # Re-normalising x in every program costs more than the kernels it saves on large weights
    # (Llama-3.1-8B's gate_up and qkv were slower fused than apart).
    if norm_pass and big and (gated or (m > 2 and rows < 32768)):
        return None
    if gpu.fast_memory and (config := _fast_memory_config(m, rows, k, gated, big)):
        return None if config is CUBLAS else config
    if big and k >= 2048:  # Llama-3.1-8B's projections (benchmarks/gemv_sweep.py)
        if m == 1 and rows >= k:  # the whole row in one tile, all of it loaded before gdc_wait
            return (GemvConfig(block_n=2, block_k=4096, num_warps=8) if k <= 4096
                    else GemvConfig(block_n=4, block_k=2048, num_warps=8))
        if m == 1:  # a long reduction (8B's down: faster than the 32 x 512 dot tiles)
            return GemvConfig(block_n=4, block_k=1024)
        if gated or k < rows < 2 * k:
            return GemvConfig(block_n=64, block_k=256, num_stages=3, use_dot=True)
        return GemvConfig(block_n=32, block_k=512, num_stages=3, use_dot=True)
    return _small_config(m, rows, k, gated, big)


def _small_config(m: int, rows: int, k: int, gated: bool, big: bool) -> GemvConfig:
    if m <= 2 and (not big or (m == 1 and rows > k)):
        return GemvConfig(block_n=1 if gated else 2, block_k=1024)
    if rows >= 2 * k:
        return GemvConfig(block_n=32 if gated else 64, block_k=256, num_stages=3, use_dot=True)
    return GemvConfig(block_n=32 if k >= 4096 else 16, block_k=512, num_stages=3, use_dot=True)


def _fast_memory_config(m: int, rows: int, k: int, gated: bool, big: bool) -> GemvConfig | None:
    """Where each SM must keep ~1.4x an H100's bytes in flight (an H200). Chosen inside the whole
    batch-1 decode graph (benchmarks/gemv_graph_sweep.py: alone, deeper tiles read faster, but
    beside the kernels PDL overlaps with them the 8B step got slower; BENCHMARKS.md, twelfth
    session). One row of a large weight: cuBLAS for a merged gate/up (the norm and SiLU as their
    own kernels), tensor-core dot tiles for the LM head and a QKV projection, wider FMA rows for
    a square one when its reduction splits evenly (cuBLAS when not), the H100's tiles for a long
    reduction (down). A long, small reduction takes longer rows (SmolLM2's down_proj)."""
    if m <= 2 and not big and k > 1024:
        return GemvConfig(block_n=1, block_k=2048)
    if m != 1 or not big or k < 2048:
        return None
    if gated:
        return CUBLAS
    if rows >= 32768:  # an LM head
        return GemvConfig(block_n=64, block_k=256, num_stages=3, use_dot=True)
    if k < rows < 2 * k:  # a QKV projection
        return GemvConfig(block_n=32, block_k=512, num_stages=3, use_dot=True, early_release=True)
    if rows == k:  # an output projection
        return GemvConfig(block_n=4, block_k=2048, num_warps=8) if k % 2048 == 0 else CUBLAS
    return None


def early_release(cfg: GemvConfig, weight_numel: int, grid: int, device: torch.device) -> bool:
    """Whether the next kernel may launch when this GEMV starts (see EARLY_RELEASE_MAX_WEIGHT)."""
    if cfg.early_release is not None:
        return cfg.early_release
    return (weight_numel <= EARLY_RELEASE_MAX_WEIGHT
            or grid * cfg.num_warps <= ONE_WAVE_WARPS_PER_SM * num_sms(device))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, gated: bool = False, config: GemvConfig | None = None,
         out: torch.Tensor | None = None, sumsq: torch.Tensor | None = None,
         want_sumsq: bool = False):
    """x: [M <= 8, K], weight: [N, K] contiguous. Returns [M, N] (into out if given):
    rmsnorm(x; norm_weight, eps) if norm_weight is given, else x, times weight.T, + bias; if gated
    (weight is a merged [gate | up]), silu(gate) * up, [M, N / 2]; + residual. config: tiles,
    default_config's when None (which must then not be None for this shape).
    sumsq: x's sum of squares per row in parts, [M, parts] float32 (summed in any order), for the
    norm; want_sumsq: also return the output's, as (out, sumsq)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv serves 1..{MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    assert weight.is_contiguous()
    norm_pass = norm_weight is not None and sumsq is None
    cfg = config or default_config(m, n, k, norm_pass, gated, gpu_traits(x.device))
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.is_contiguous()
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    if sumsq is not None:
        assert sumsq.shape[0] == m and sumsq.dtype == torch.float32 and sumsq.is_contiguous()
    grid = triton.cdiv(n, cfg.block_n)
    persistent = cfg.programs_per_sm > 0
    if persistent:
        if cfg.block_k < k:
            raise ValueError(f"a persistent GEMV needs block_k >= k ({cfg.block_k} < {k})")
        grid = min(grid, cfg.programs_per_sm * num_sms(x.device))
    sumsq_out = torch.empty((m, grid), dtype=torch.float32, device=x.device) if want_sumsq else None
    m_pad = triton.next_power_of_2(m)
    use_pdl = pdl(x)
    parts = sumsq.shape[1] if sumsq is not None else 1
    if persistent:
        _gemv_persistent_kernel[(grid,)](
            x, weight, out, bias if bias is not None else out,
            residual if residual is not None else out,
            norm_weight if norm_weight is not None else out,
            sumsq if sumsq is not None else out, sumsq_out if want_sumsq else out,
            eps, m, n, k, parts, x.stride(0), residual.stride(0) if residual is not None else 0,
            HAS_NORM=norm_weight is not None, SUMSQ_IN=sumsq is not None, SUMSQ_OUT=want_sumsq,
            PARTS_BLOCK=triton.next_power_of_2(parts), GATED=gated, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, M_PAD=m_pad, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot, PDL=use_pdl, launch_pdl=use_pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return (out, sumsq_out) if want_sumsq else out
    _gemv_kernel[(grid,)](
        x, weight, out, bias if bias is not None else out,
        residual if residual is not None else out,
        norm_weight if norm_weight is not None else out,
        sumsq if sumsq is not None else out, sumsq_out if want_sumsq else out,
        eps, m, n, k, parts, x.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_NORM=norm_weight is not None, SUMSQ_IN=sumsq is not None, SUMSQ_OUT=want_sumsq,
        PARTS_BLOCK=triton.next_power_of_2(parts), GATED=gated, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, M_PAD=m_pad,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NORM_BLOCK=min(triton.next_power_of_2(k), 8192 // m_pad), USE_DOT=cfg.use_dot, PDL=use_pdl,
        EARLY_RELEASE=early_release(cfg, weight.numel(), grid, x.device),
        launch_pdl=use_pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (out, sumsq_out) if want_sumsq else out
