"""Triton kernels: KV-cache store and paged decode attention. Torch references: kernels/reference.py.

Cache layout as in the reference: [num_blocks, block_size, kv_heads, head_dim], contiguous. Rows
with slot -1 (store) or seq_len 0 (attention) are padding, as in a CUDA-graph batch: skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim], each token's row contiguous (they may be QKV views)."""
    tokens, kvh, d = k.shape
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
    if tokens:
        _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    ROW=kvh * d, BLOCK=triton.next_power_of_2(kvh * d))


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, len_ptr, out_ptr, scale,
                   stride_q, stride_o, stride_table,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (sequence, kv head): the GROUP query heads sharing that kv head are the rows
    # of one small matrix, so each K/V row is read once for all of them (GQA-aware).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(len_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_q + heads[:, None] * HEAD_DIM + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + n
        valid = pos < seq_len
        block = tl.load(table_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=valid, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * KV_HEADS + kv_head
        offs = row[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows (seq_len 0) write zeros
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_o + heads[:, None] * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q: [B, heads, d] (rows contiguous) -> [B, heads, d]."""
    B, heads, d = q.shape
    kvh, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kvh
    out = torch.empty_like(q) if out is None else out
    if B:
        _decode_kernel[(B, kvh)](
            q, k_cache, v_cache, block_tables, seq_lens, out, scale,
            q.stride(0), out.stride(0), block_tables.stride(0),
            KV_HEADS=kvh, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_N=64 if d <= 128 else 32)
    return out
