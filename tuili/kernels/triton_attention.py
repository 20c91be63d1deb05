"""Triton kernels: KV-cache store, paged decode attention (split along the sequence, the splits
merged in the same launch) and paged prefill attention (flash-style, causal, variable lengths).
Torch references: kernels/reference.py.

Cache layout as in the reference: [num_blocks, block_size, kv_heads, head_dim], contiguous. Rows
with slot -1 (store) or seq_len 0 (attention) are padding, as in a CUDA-graph batch: skipped.
Attention runs after this step's K/V are stored, so both kernels read every key from the cache:
a cached prefix and a chunk computed earlier need no gather. A sliding window (> 0) keeps each
query's last `window` keys: the kernels start their loops at the window, reading no key before it.
An FP8 cache comes with per-kv-head scales (k_scale, v_scale: [kv_heads] float32): the store
quantizes (x / scale, clamped to +-448), and the attention kernels cast each tile to q's dtype
(exact for e4m3) and fold the scales in: k's into the scores' scale, v's into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tuili.kernels import arrival_counters, num_sms, pdl

MAX_SPLITS = 32
MAX_SPLIT_PROGRAMS = 4096  # (sequence, kv head) pairs a split launch may have: one ticket each


@triton.jit
def quantize(x, scale_ptr, head, mask, cache_ptr, QUANT: tl.constexpr):
    """x as the cache stores it: x / scale[head] clamped to +-448 (float8_e4m3fn's largest
    finite value), cast (QUANT); else x."""
    y = x
    if QUANT:  # one return after the branch: the compiler types every return alike
        s = tl.load(scale_ptr + head, mask=mask, other=1.0)
        y = tl.minimum(tl.maximum(x.to(tl.float32) / s, -448.0), 448.0)
        y = y.to(cache_ptr.dtype.element_ty)
    return y


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                     stride_k, stride_v, ROW: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        k = quantize(k, k_scale_ptr, offs // HEAD_DIM, mask, k_cache_ptr, QUANT)
        v = quantize(v, v_scale_ptr, offs // HEAD_DIM, mask, v_cache_ptr, QUANT)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k, v: [tokens, kv_heads, head_dim], each token's row contiguous (they may be QKV views);
    with scales, quantized into an FP8 cache."""
    tokens, kvh, d = k.shape
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
    if tokens:
        _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping,
                                    k_scale if k_scale is not None else k,
                                    v_scale if v_scale is not None else v,
                                    k.stride(0), v.stride(0), ROW=kvh * d, HEAD_DIM=d,
                                    BLOCK=triton.next_power_of_2(kvh * d),
                                    QUANT=k_scale is not None)


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, table, kv_head, start, hi, KV_HEADS: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
             dtype: tl.constexpr):
    """Keys and values start .. start + BLOCK_N of one sequence (rows past hi: zeros) in dtype
    (an FP8 cache's values unscaled), and which rows are keys."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < hi
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0)
    row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * KV_HEADS + kv_head
    offs = row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0).to(dtype)
    v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0).to(dtype)
    return k, v, valid


@triton.jit
def kv_scales(k_scale_ptr, v_scale_ptr, kv_head, QUANT: tl.constexpr):
    """An FP8 cache's (k scale, v scale) of one kv head; (1, 1) for a 16-bit cache."""
    k_scale = 1.0
    v_scale = 1.0
    if QUANT:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    return k_scale, v_scale


@triton.jit
def _attend_range(q, k_cache_ptr, v_cache_ptr, table, kv_head, lo, hi, qk_scale, v_scale,
                  KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Online softmax of the q rows over keys lo..hi of one sequence: (acc, row max, row sum);
    qk_scale holds the keys' scale, acc is multiplied by the values'."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k, v, valid = _kv_tile(k_cache_ptr, v_cache_ptr, table, kv_head, start, hi, KV_HEADS,
                               HEAD_DIM, BLOCK_SIZE, BLOCK_N, q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc * v_scale, m_i, l_i


@triton.jit
def _wait_for_q(q_rows, live, PDL: tl.constexpr):
    """The q rows, once the kernel that wrote them and stored this step's K/V is done."""
    if PDL:
        gdc_wait()
    return tl.load(q_rows, mask=live, other=0.0)


@triton.jit
def _attend_whole(q_rows, out_rows, live, k_cache_ptr, v_cache_ptr, table, kv_head, first,
                  seq_len, qk_scale, v_scale, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr,
                  PDL: tl.constexpr):
    """Attention of the q rows over keys first .. seq_len, written to out_rows (zeros when none)."""
    q = _wait_for_q(q_rows, live, PDL)
    acc, m_i, l_i = _attend_range(q, k_cache_ptr, v_cache_ptr, table, kv_head, first, seq_len,
                                  qk_scale, v_scale, KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, GROUP_PAD)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=live)


@triton.jit
def _merge_splits(part_ptr, lse_ptr, out_ptr, stride_o, seq, kv_head, used,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, MERGE_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """Weight each of the first `used` splits' outputs (each normalised over its own range) by its
    share of the softmax mass, for the GROUP heads of one kv head. Reads bypass L1: other SMs
    wrote these rows during this launch."""
    g = tl.arange(0, MERGE_PAD)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, SPLITS)
    heads = kv_head * GROUP + g
    rows = (seq * NUM_HEADS + heads) * SPLITS
    live = g < GROUP
    lse = tl.load(lse_ptr + rows[:, None] + s[None, :], mask=live[:, None] & (s < used)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse - top[:, None]), 1)
    acc = tl.zeros([MERGE_PAD, HEAD_DIM], tl.float32)
    for i in tl.static_range(SPLITS):
        here = live & (i < used)
        w = tl.exp2(tl.load(lse_ptr + rows + i, mask=here, other=float("-inf"),
                            cache_modifier=".cg") - top)
        part = tl.load(part_ptr + (rows + i)[:, None] * HEAD_DIM + d[None, :],
                       mask=here[:, None], other=0.0, cache_modifier=".cg")
        acc += part * w[:, None]
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # no keys (padding row): zeros
    tl.store(out_ptr + seq * stride_o + heads[:, None] * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None])


# Arguments that change from step to step (a table's width, a view's offset, how many sequences)
# are not specialised on: each new value would compile another variant mid-run.
@triton.jit(do_not_specialize=["stride_table"], do_not_specialize_on_alignment=["table_ptr"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, len_ptr, out_ptr, part_ptr, lse_ptr,
                   ticket_ptr, k_scale_ptr, v_scale_ptr, scale, stride_q, stride_o, stride_table,
                   window, QUANT: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   MERGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    # One program per (sequence, kv head, split): the GROUP query heads sharing the kv head are the
    # rows of one small matrix, so each K/V row is read once for all of them (GQA-aware), and the
    # sequence is cut into up to SPLITS ranges of whole BLOCK_N tiles so a batch of one still
    # spreads over the whole GPU. Lengths and block tables are the step's inputs, not the previous
    # kernel's outputs: they are read before waiting for it, and a split with no keys ends at once.
    if PDL:  # launched early (see kernels.pdl)
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + seq)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # the window's first key
    span = seq_len - first
    per_split = tl.maximum(tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)
    used = tl.cdiv(span, per_split)  # splits that hold keys; 0 for a padding row
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    live = (g < GROUP)[:, None]
    k_scale, v_scale = kv_scales(k_scale_ptr, v_scale_ptr, kv_head, QUANT)
    qk_scale = scale * k_scale * 1.4426950408889634
    table = table_ptr + seq * stride_table
    q_rows = q_ptr + seq * stride_q + heads[:, None] * HEAD_DIM + d[None, :]
    out_rows = out_ptr + seq * stride_o + heads[:, None] * HEAD_DIM + d[None, :]
    if SPLITS == 1:
        _attend_whole(q_rows, out_rows, live, k_cache_ptr, v_cache_ptr, table, kv_head, first,
                      seq_len, qk_scale, v_scale, KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, GROUP_PAD,
                      PDL)
    elif used <= 1:  # one range (or none: a padding row gets zeros): split 0 writes the output
        if split == 0:
            _attend_whole(q_rows, out_rows, live, k_cache_ptr, v_cache_ptr, table, kv_head,
                          first, seq_len, qk_scale, v_scale, KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                          BLOCK_N, GROUP_PAD, PDL)
    elif lo < hi:
        q = _wait_for_q(q_rows, live, PDL)
        acc, m_i, l_i = _attend_range(q, k_cache_ptr, v_cache_ptr, table, kv_head, lo, hi,
                                      qk_scale, v_scale, KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, GROUP_PAD)
        rows = (seq * KV_HEADS * GROUP + heads) * SPLITS + split
        tl.store(part_ptr + rows[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], mask=live)
        tl.store(lse_ptr + rows, m_i + tl.log2(l_i), mask=g < GROUP)
        # The split that arrives last merges: every thread's stores above come before the
        # release of the ticket (barrier, then an acq_rel add), and it resets the ticket to 0 for
        # the next launch (or graph replay).
        tl.debug_barrier()
        ticket = ticket_ptr + seq * KV_HEADS + kv_head
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == used - 1:
            _merge_splits(part_ptr, lse_ptr, out_ptr, stride_o, seq, kv_head, used,
                          KV_HEADS * GROUP, GROUP, MERGE_PAD, HEAD_DIM, SPLITS)
            tl.store(ticket, 0)


def _tickets(device: torch.device) -> torch.Tensor:
    """Arrival counters of the split programs, one per (sequence, kv head)."""
    return arrival_counters(device, "decode_attention", MAX_SPLIT_PROGRAMS)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel: ranges per sequence, keys per step, warps, stages."""
    splits: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


def decode_splits(batch: int, kv_heads: int, device: torch.device, max_len: int | None = None
                  ) -> int:
    """How many ranges to cut each sequence into so that about two programs run per SM.
    max_len, when known, stops splitting short contexts finer than 128 tokens a range."""
    programs = batch * kv_heads
    sms = num_sms(device)
    splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * sms, programs)))
    if max_len:
        splits = min(splits, triton.next_power_of_2(triton.cdiv(max_len, 128)))
    return max(splits, 1) if programs < sms else 1


def decode_config(batch: int, kv_heads: int, head_dim: int, device: torch.device,
                  max_len: int | None = None) -> DecodeConfig:
    """The launch shape for a batch; it depends on the batch size alone when max_len is None.
    64-key steps, 4 warps, 3 stages won the H100's sweep; the H200's faster 128-key steps alone
    were no faster inside the decode graph, so both cards use them (BENCHMARKS.md, "Measurements
    behind the code")."""
    splits = decode_splits(batch, kv_heads, device, max_len)
    return DecodeConfig(splits, 64 if head_dim <= 128 else 32)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, max_len: int | None = None,
                     config: DecodeConfig | None = None, window: int = 0,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """One query token per sequence, in one launch. q: [B, heads, d] (rows contiguous) ->
    [B, heads, d]. config overrides the launch shape (for tuning); window > 0: the last `window`
    keys alone; scales: an FP8 cache's."""
    B, heads, d = q.shape
    kvh, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kvh
    out = torch.empty_like(q) if out is None else out
    if not B:
        return out
    if window > 0:  # the splits cut the window alone
        max_len = min(max_len, window) if max_len else window
    cfg = config or decode_config(B, kvh, d, q.device, max_len)
    tickets = _tickets(q.device)
    part = lse = out  # unused when not split
    if cfg.splits > 1:
        if B * kvh > tickets.numel():
            raise ValueError(f"split decode of {B} x {kvh} (sequence, kv head) pairs: at most "
                             f"{tickets.numel()}; use one split")
        part = torch.empty(B, heads, cfg.splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, heads, cfg.splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, kvh, cfg.splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, lse, tickets,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q, scale,
        q.stride(0), out.stride(0), block_tables.stride(0), window, QUANT=k_scale is not None,
        KV_HEADS=kvh, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        MERGE_PAD=triton.next_power_of_2(group), HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n, SPLITS=cfg.splits, PDL=pdl(q), launch_pdl=pdl(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@triton.jit(do_not_specialize=["stride_table", "num_seqs"],
            do_not_specialize_on_alignment=["table_ptr"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, seqs_ptr, out_ptr, k_scale_ptr,
                    v_scale_ptr, scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
                    num_seqs, window, QUANT: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (head, sequence, query tile). Query i of a sequence sits at position
    # context + i and sees keys 0 .. context + i, all read from the paged cache. The last tiles
    # (the most keys under the causal mask) start first, so the short ones fill the tail.
    head = tl.program_id(0)
    seq = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(seqs_ptr + seq)
    q_len = tl.load(seqs_ptr + num_seqs + seq)
    context = tl.load(seqs_ptr + 2 * num_seqs + seq)
    if tile * BLOCK_M >= q_len:
        return
    kv_head = head // GROUP
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = m < q_len
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
                + d[None, :], mask=m_valid[:, None], other=0.0)
    q_pos = context + m
    # The running max starts finite, below any score: with a window, a row may see none of a
    # step's keys (one before its window: its rows' windows start up to BLOCK_M - 1 keys apart),
    # and an all -inf max would give exp2(-inf - -inf) = NaN. From -1e30 such a step adds
    # exp2(-inf) = 0 and rescales by exp2(0) = 1, and the first seen key rescales the rest by
    # exp2(-1e30 - max) = 0: the results, and the cost, of the unwindowed path are unchanged.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_scale, v_scale = kv_scales(k_scale_ptr, v_scale_ptr, kv_head, QUANT)
    qk_scale = scale * k_scale * 1.4426950408889634
    table = table_ptr + seq * stride_table
    # Keys before the tile's first query are visible to every row: no causal mask there. With a
    # window, the loop starts at the tile's first query's first key (a BLOCK_N step below it),
    # and every step is masked.
    windowed = window > 0
    unmasked_end = tl.where(windowed, 0, (context + tile * BLOCK_M) // BLOCK_N * BLOCK_N)
    lo = tl.where(windowed, tl.maximum(context + tile * BLOCK_M - window + 1, 0), 0)
    lo = lo // BLOCK_N * BLOCK_N
    hi = context + tl.minimum((tile + 1) * BLOCK_M, q_len)
    for start in range(lo, hi, BLOCK_N):
        k, v, valid = _kv_tile(k_cache_ptr, v_cache_ptr, table, kv_head, start, hi, KV_HEADS,
                               HEAD_DIM, BLOCK_SIZE, BLOCK_N, q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if start >= unmasked_end:
            pos = start + n
            seen = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            seen = seen & ((pos[None, :] > q_pos[:, None] - window) | (window <= 0))
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seqs: torch.Tensor, max_q_len: int, scale: float,
                      out: torch.Tensor, window: int = 0, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for several sequences' new tokens, their K/V already in the cache.
    q, out: [tokens, heads, d]; seqs: [3, num_seqs] int32 rows (first q row, new tokens, context);
    block_tables: one row per sequence; window > 0: each query's last `window` keys alone;
    scales: an FP8 cache's."""
    heads, d = q.shape[1], q.shape[2]
    kvh, block_size = k_cache.shape[2], k_cache.shape[1]
    num_seqs = seqs.shape[1]
    # The best of an H100 sweep at 2048 tokens, head dim 128 (BENCHMARKS.md, "Measurements
    # behind the code").
    block_m, block_n, warps, stages = (128, 64, 4, 3) if d <= 128 else (64, 32, 8, 2)
    if num_seqs:
        _prefill_kernel[(heads, num_seqs, triton.cdiv(max_q_len, block_m))](
            q, k_cache, v_cache, block_tables, seqs, out,
            k_scale if k_scale is not None else q, v_scale if v_scale is not None else q, scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            num_seqs, window, QUANT=k_scale is not None, KV_HEADS=kvh, GROUP=heads // kvh, HEAD_DIM=d, BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out
