"""One Triton launch between the QKV projection and attention: per-head RMSNorm of q and k
(Qwen3's q_norm/k_norm, optional), rotary on q and k, and the store of k and v into the paged
cache (slot -1: padding, skipped). Returns q rotated; k rotated goes only to the cache, from where
the attention kernels read every key. Each token's cos and sin are read from the whole tables at
its position, so no gather runs before it. With k/v scales (an FP8 cache) k and v are stored
quantized per kv head (triton_attention.quantize).

References: rms_norm, apply_rotary and store_kv in kernels/reference.py. The kernel rounds to the
model dtype where they do (launched with fp fusion off, so no multiply-add contracts two steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tuili.kernels import pdl
from tuili.kernels.triton_attention import quantize


@triton.jit
def _head_rms_norm(x1, x2, w_ptr, eps, j, HALF: tl.constexpr):
    """RMSNorm of each head (row) given as its two halves; rounded as reference.rms_norm."""
    h1 = x1.to(tl.float32)
    h2 = x2.to(tl.float32)
    mean = (tl.sum(h1 * h1, 1) + tl.sum(h2 * h2, 1)) * (1.0 / (2 * HALF))
    r = tl.rsqrt(mean + eps)[:, None]
    y1 = (h1 * r).to(x1.dtype).to(tl.float32)
    y2 = (h2 * r).to(x1.dtype).to(tl.float32)
    w1 = tl.load(w_ptr + j).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + j).to(tl.float32)
    return (w1 * y1).to(x1.dtype), (w2 * y2).to(x1.dtype)


@triton.jit
def _rounded_product(a, b):
    return (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype).to(tl.float32)


@triton.jit
def rotate(x1, x2, c1, c2, s1, s2):
    """x * cos + rotate_half(x) * sin for x given as its two halves (and cos, sin as theirs): each
    product and the sum rounded to x's dtype as torch rounds them."""
    r1 = (_rounded_product(x1, c1) - _rounded_product(x2, s1)).to(x1.dtype)
    r2 = (_rounded_product(x2, c2) + _rounded_product(x1, s2)).to(x1.dtype)
    return r1, r2


@triton.jit
def _rope_heads(x_ptr, heads, mask, norm_ptr, eps, c1, c2, s1, s2, j,
                HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rows `heads` of one token (each 2 * HALF wide, from x_ptr), normalised if HAS_NORM, then
    rotated."""
    base = x_ptr + heads * (2 * HALF)
    x1 = tl.load(base + j, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0)
    if HAS_NORM:
        x1, x2 = _head_rms_norm(x1, x2, norm_ptr, eps, j, HALF)
    return rotate(x1, x2, c1, c2, s1, s2)


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr,
                       k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, eps,
                       stride_t, QUANT: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                       KV_PAD: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                       PDL: tl.constexpr):
    # One program per token: its q heads, then (unless padding) its k and v heads.
    if PDL:  # launched early (see kernels.pdl): wait for the QKV projection
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    j = tl.arange(0, HALF)[None, :]
    at = tl.load(pos_ptr + t).to(tl.int64) * (2 * HALF)  # the token's row of the cos/sin tables
    c1 = tl.load(cos_ptr + at + j)
    c2 = tl.load(cos_ptr + at + HALF + j)
    s1 = tl.load(sin_ptr + at + j)
    s2 = tl.load(sin_ptr + at + HALF + j)
    row = qkv_ptr + t.to(tl.int64) * stride_t
    hq = tl.arange(0, HEADS_PAD)[:, None]
    mq = hq < HEADS
    q1, q2 = _rope_heads(row, hq, mq, q_norm_ptr, eps, c1, c2, s1, s2, j, HALF, HAS_NORM)
    q_out = q_out_ptr + t.to(tl.int64) * (HEADS * 2 * HALF) + hq * (2 * HALF)
    tl.store(q_out + j, q1, mask=mq)
    tl.store(q_out + HALF + j, q2, mask=mq)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        hk = tl.arange(0, KV_PAD)[:, None]
        mk = hk < KV_HEADS
        k1, k2 = _rope_heads(row + HEADS * 2 * HALF, hk, mk, k_norm_ptr, eps, c1, c2, s1, s2, j, HALF,
                             HAS_NORM)
        cached = slot * (KV_HEADS * 2 * HALF) + hk * (2 * HALF)
        tl.store(k_cache_ptr + cached + j, quantize(k1, k_scale_ptr, hk, mk, k_cache_ptr, QUANT),
                 mask=mk)
        tl.store(k_cache_ptr + cached + HALF + j,
                 quantize(k2, k_scale_ptr, hk, mk, k_cache_ptr, QUANT), mask=mk)
        dv = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(row + (HEADS + KV_HEADS) * 2 * HALF + hk * (2 * HALF) + dv, mask=mk, other=0.0)
        tl.store(v_cache_ptr + cached + dv, quantize(v, v_scale_ptr, hk, mk, v_cache_ptr, QUANT),
                 mask=mk)


def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   num_heads: int, norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                   eps: float = 0.0, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [tokens, heads + 2 * kv_heads, d], each token's row contiguous; positions: [tokens];
    cos, sin: [max_len, d] tables (RotaryEmbedding's); norm_weights: (q_norm, k_norm) weights of d
    each, or None. Stores k (normalised, rotated) and v at their slots; returns q (normalised,
    rotated) as [tokens, heads, d]. With scales ([kv_heads] float32 each), k and v are stored
    quantized into an FP8 cache."""
    tokens, rows, d = qkv.shape
    kv_heads = (rows - num_heads) // 2
    assert qkv.stride(2) == 1 and qkv.stride(1) == d and d % 2 == 0
    assert cos.shape[-1] == d and cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.shape[-2:] == (kv_heads, d) and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty((tokens, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        q_norm, k_norm = norm_weights if norm_weights is not None else (qkv, qkv)
        _rope_store_kernel[(tokens,)](
            qkv, positions, cos, sin, q_norm, k_norm, q, k_cache, v_cache, slot_mapping,
            k_scale if k_scale is not None else qkv, v_scale if v_scale is not None else qkv, eps,
            qkv.stride(0), QUANT=k_scale is not None, HEADS=num_heads, KV_HEADS=kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(kv_heads),
            HALF=d // 2, HAS_NORM=norm_weights is not None, PDL=pdl(qkv), launch_pdl=pdl(qkv),
            enable_fp_fusion=False)
    return q
