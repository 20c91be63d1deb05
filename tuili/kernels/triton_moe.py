"""The fused mixture-of-experts MLP on the GPU: the (token, expert) pairs sorted by expert into
blocks of BLOCK_M rows (each block one expert's, padded), then two grouped GEMMs over the stacked
expert weights: [gate | up] with SiLU-and-mul in its epilogue, and down with the routing weight in
its epilogue. A block reads only its own expert's weights, so a step reads the chosen experts'
alone (at batch 1: top_k of them). No host sync anywhere: CUDA graphs capture it whole.
Reference: kernels/reference_moe.fused_moe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoETiles:
    """Launch shape of both GEMMs."""
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_config(pairs: int, num_experts: int) -> MoETiles:
    """Tiles by the rows an expert gets on average (pairs = tokens * top_k): decode's few rows
    take narrow N tiles, so that the top_k experts' weights spread over many programs."""
    per_expert = pairs / num_experts
    if per_expert <= 4:
        return MoETiles(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 32:
        return MoETiles(block_m=32, block_n=64, block_k=64)
    return MoETiles(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def align_by_expert(ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_slots [P], block_experts [P // block_m]): the flat (token, k) slots grouped by
    expert, each expert's group padded to a multiple of block_m with the sentinel tokens*top_k;
    the expert of each block, -1 past the last used block. P is the most any routing can need,
    so the shapes depend on ids.shape alone."""
    pairs = ids.numel()
    flat = ids.flatten()
    most = pairs + min(num_experts, pairs) * (block_m - 1)
    padded_len = triton.cdiv(most, block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    dest = (padded_end - padded)[expert_of] + rank
    sorted_slots = torch.full((padded_len,), pairs, dtype=torch.int32, device=ids.device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, padded_len, block_m, device=ids.device)
    block_experts = torch.searchsorted(padded_end, starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_slots, block_experts


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, slots_ptr, experts_ptr, weights_ptr,
                     num_pairs, N, K, stride_a, stride_we, stride_wn, stride_out, half_offset,
                     ROWS_PER_A: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[slot, n] = a[slot // ROWS_PER_A] . w[expert, n] for the slots of block program_id(0):
    GATED: silu(a . w[n]) * (a . w[half_offset + n]); MUL_WEIGHT: times weights[slot]."""
    block = tl.program_id(0)
    expert = tl.load(experts_ptr + block)
    if expert < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + offs_m)
    valid = slots < num_pairs
    a_rows = tl.where(valid, slots // ROWS_PER_A, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
              + offs_k[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_ptrs + half_offset * stride_wn, mask=k_ok[:, None] & n_ok[None, :],
                           other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + slots, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _gemm(a, w, out, slots, experts, weights, num_pairs, n, rows_per_a, gated, config):
    grid = (experts.shape[0], triton.cdiv(n, config.block_n))
    _moe_gemm_kernel[grid](
        a, w, out, slots, experts, weights if weights is not None else slots, num_pairs, n,
        a.shape[1], a.stride(0), w.stride(0), w.stride(1), out.stride(0), n,
        ROWS_PER_A=rows_per_a, GATED=gated, MUL_WEIGHT=weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, config: MoETiles | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); x [tokens, hidden] contiguous, w13
    [experts, 2 * inter, hidden], w2 [experts, hidden, inter], weights/ids [tokens, top_k]."""
    tokens, top_k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    pairs = tokens * top_k
    config = config or default_config(pairs, num_experts)
    slots, experts = align_by_expert(ids, num_experts, config.block_m)
    x = x.contiguous()
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, h, slots, experts, None, pairs, inter, top_k, True, config)
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    _gemm(h, w2, y, slots, experts, weights.flatten().float().contiguous(), pairs, hidden, 1,
          False, config)
    return y.view(tokens, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)
