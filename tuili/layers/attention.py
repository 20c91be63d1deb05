"""Attention over the paged KV cache: store this step's K/V, then attend.

The model sees only flat tokens plus an AttentionMetadata; the runner builds one per step.
Rows are ordered decodes first (one token each), then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from tuili.kernels import on_gpu, reference, triton_module
from tuili.layers.norm import RMSNorm
from tuili.layers.rotary import RotaryEmbedding, rotate_qk


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] flat cache slot of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] padded with 0
    seq_lens: torch.Tensor  # [seqs] cached + new tokens after this step
    positions: torch.Tensor  # [tokens] position of each new token
    rope: RotaryEmbedding  # cos/sin of every position; the GPU kernels look theirs up in place
    num_decodes: int  # the first num_decodes sequences have one new token each
    max_decode_len: int
    # Per prefill sequence (python ints, no device syncs): first row, new tokens, cached tokens.
    prefills: list[tuple[int, int, int]]
    # The same as an int32 [3, num_prefills] device tensor, for the GPU prefill kernel.
    prefill_seqs: torch.Tensor | None = None

    @cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the new tokens' positions [tokens, 1, head_dim], for the torch path."""
        return self.rope.lookup(self.positions)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None  # bound by the runner
        self.v_cache: torch.Tensor | None = None

    def _pow2_head(self) -> bool:
        return self.head_dim & (self.head_dim - 1) == 0

    def prepare_qkv(self, qkv: torch.Tensor, meta: AttentionMetadata, q_norm: RMSNorm | None = None,
                    k_norm: RMSNorm | None = None):
        """q, k, v from the merged QKV output [tokens, heads + 2 * kv_heads, d]: q and k normalised
        per head (when norms are given, as in Qwen3) and rotated. On the GPU one kernel does this
        and also stores k and v in the cache: k and v come back None, so forward() skips its store."""
        if on_gpu(qkv) and self._pow2_head():
            weights = None if q_norm is None else (q_norm.weight, k_norm.weight)
            q = triton_module("triton_rope").rope_and_store(
                qkv, meta.positions, meta.rope.cos, meta.rope.sin, self.k_cache, self.v_cache,
                meta.slot_mapping, self.num_heads, weights, q_norm.eps if q_norm is not None else 0.0)
            return q, None, None
        return rotate_qk(qkv, self.num_heads, self.num_kv_heads, *meta.cos_sin, q_norm, k_norm)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d], or None when already in the cache
        (GPU only: the GPU kernels read every key from the cache) -> [tokens, heads * d]."""
        nd = meta.num_decodes
        gpu = on_gpu(q)
        triton_attention = triton_module("triton_attention") if gpu else None
        if k is None:
            assert gpu, "the CPU path needs this step's k and v"
        elif gpu:
            triton_attention.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            reference.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q) if meta.prefills or gpu else None
        if nd and gpu:
            triton_attention.decode_attention(q[:nd], self.k_cache, self.v_cache, meta.block_tables,
                                              meta.seq_lens, self.scale, out=out[:nd],
                                              max_len=meta.max_decode_len or None)
        elif nd:
            decoded = reference.decode_attention(
                q[:nd], self.k_cache, self.v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                meta.max_decode_len, self.scale)
            if out is None:
                return decoded.flatten(1)
            out[:nd] = decoded
        if meta.prefills and gpu:
            triton_attention.prefill_attention(
                q, self.k_cache, self.v_cache, meta.block_tables[nd:], meta.prefill_seqs,
                max(n for _, n, _ in meta.prefills), self.scale, out)
            return out.flatten(1)
        for i, (start, n, cached) in enumerate(meta.prefills):
            rows = slice(start, start + n)
            out[rows] = reference.prefill_attention(
                q[rows], k[rows], v[rows], self.k_cache, self.v_cache,
                meta.block_tables[nd + i], cached, self.scale)
        return out.flatten(1)
