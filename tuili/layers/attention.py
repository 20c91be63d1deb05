"""Attention over the paged KV cache: rotate q and k, store this step's K/V, then attend.

The model sees only flat tokens plus an AttentionMetadata, which its attention backend builds (the
runner asks it once per step). Rows are ordered decodes first (one token each), then prefill
chunks. A backend is chosen once, with the model's (layers/backend.py): non-causal attention is a
new backend, not a branch in these. A sliding window is a layer's (Attention.window): each
backend's kernels then read only the window's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from tuili.kernels import reference, triton_module
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
    # A hybrid model's recurrent-state slot of each sequence [seqs] (engine/state_cache.py).
    state_slots: torch.Tensor | None = None
    state_slot_list: list[int] | None = None  # the same as host ints
    # (sequence, tokens into its chunk, snapshot): states to snapshot part-way through a chunk
    state_saves: list[tuple[int, int, int]] | None = None

    @classmethod
    def one_prefill(cls, n: int, rope: RotaryEmbedding, device: torch.device) -> AttentionMetadata:
        """One sequence's whole prefill of n tokens into caches of n one-token blocks (a
        start-up measurement's stand-ins)."""
        positions = torch.arange(n, device=device)
        return cls(slot_mapping=positions, block_tables=positions[None, :],
                   seq_lens=torch.tensor([n], device=device), positions=positions, rope=rope,
                   num_decodes=0, max_decode_len=0, prefills=[(0, n, 0)],
                   prefill_seqs=torch.tensor([[0], [n], [0]], dtype=torch.int32, device=device))

    @cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the new tokens' positions [tokens, 1, head_dim], for the torch path."""
        return self.rope.lookup(self.positions)

    @cached_property
    def local_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the local-rope table (layers with local_rope)."""
        return self.rope.local.lookup(self.positions) if self.rope.local is not self.rope \
            else self.cos_sin

    @cached_property
    def folded_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin with sin folded (reference.fold_sin), for the torch path's rotary."""
        cos, sin = self.cos_sin
        return cos, reference.fold_sin(sin)

    @cached_property
    def local_folded_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.local_cos_sin
        return cos, reference.fold_sin(sin)

    def decode_slots(self, block_size: int) -> torch.Tensor | None:
        """The cache slots of the keys of a step's one decode [max_decode_len] (None unless the
        step decodes exactly one sequence), found once for all the layers."""
        if self.num_decodes != 1:
            return None
        slots = self.__dict__.get("_decode_slots")
        if slots is None:
            slots = reference.cache_slots(self.block_tables[0], self.max_decode_len, block_size)
            self.__dict__["_decode_slots"] = slots
        return slots


class TorchAttention:
    """The reference path: rotary in torch, K/V stored by index, each prefill attended alone."""

    def metadata(self, **fields) -> AttentionMetadata:
        return AttentionMetadata(**fields)

    def forward(self, layer: Attention, qkv: torch.Tensor, meta: AttentionMetadata,
                q_norm=None, k_norm=None) -> torch.Tensor:
        q, k, v = rotate_qk(qkv, layer.num_heads, layer.num_kv_heads,
                            *_cos_sin(layer, meta, folded=True), q_norm, k_norm, folded=True)
        scales = layer.k_scale, layer.v_scale
        reference.store_kv(k, v, layer.k_cache, layer.v_cache, meta.slot_mapping, *scales)
        nd = meta.num_decodes
        out = torch.empty_like(q) if meta.prefills else None
        slots = self.single_decode_slots(layer, meta) if nd == 1 and not q.is_cuda else None
        if slots is not None:
            decoded = reference.single_decode(q[0], layer.k_cache, layer.v_cache, slots,
                                              layer.scale)
            if out is None:
                return decoded.view(1, -1)
            out[0] = decoded
        elif nd:
            decoded = reference.decode_attention(
                q[:nd], layer.k_cache, layer.v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                meta.max_decode_len, layer.scale, layer.window, *scales)
            if out is None:
                return decoded.flatten(1)
            out[:nd] = decoded
        for i, (start, n, cached) in enumerate(meta.prefills):
            rows = slice(start, start + n)
            out[rows] = reference.prefill_attention(
                q[rows], k[rows], v[rows], layer.k_cache, layer.v_cache,
                meta.block_tables[nd + i], cached, layer.scale, layer.window, *scales)
        return out.flatten(1)

    @staticmethod
    def single_decode_slots(layer: Attention, meta: AttentionMetadata) -> torch.Tensor | None:
        """The slots of the keys the step's one decode attends to, where single_decode serves
        it (a 16-bit cache, up to SINGLE_DECODE_MAX_LEN keys); None: decode_attention does."""
        if layer.k_scale is not None or meta.max_decode_len > reference.SINGLE_DECODE_MAX_LEN:
            return None
        slots = meta.decode_slots(layer.k_cache.shape[1])
        return slots[-layer.window:] if layer.window > 0 else slots


def _cos_sin(layer: Attention, meta: AttentionMetadata, folded: bool = False):
    """The layer's rotary tables for the step's tokens ((None, None): a layer without rotary);
    folded: sin as reference.fold_sin gives it (the torch path's)."""
    if not layer.rotary:
        return None, None
    if folded:
        return meta.local_folded_cos_sin if layer.local_rope else meta.folded_cos_sin
    return meta.local_cos_sin if layer.local_rope else meta.cos_sin


class TritonAttention:
    """Triton's kernels: one for rotary (with q/k norms) and the K/V store, where head_dim is a
    power of two; then paged decode attention and paged flash prefill, every key read from the
    cache."""

    def __init__(self):
        self._rope = triton_module("triton_rope")
        self._attention = triton_module("triton_attention")

    def metadata(self, **fields) -> AttentionMetadata:
        """The fields, plus the prefills as a device tensor for the prefill kernel."""
        prefills = fields["prefills"]
        if prefills and fields.get("prefill_seqs") is None:
            seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32)
            fields["prefill_seqs"] = seqs.to(fields["positions"].device, non_blocking=True)
        return AttentionMetadata(**fields)

    def forward(self, layer: Attention, qkv: torch.Tensor, meta: AttentionMetadata,
                q_norm=None, k_norm=None) -> torch.Tensor:
        attention = self._attention
        scales = layer.k_scale, layer.v_scale
        if layer.rotary and layer.head_dim & (layer.head_dim - 1) == 0:
            weights = None if q_norm is None else (q_norm.weight, k_norm.weight)
            rope = meta.rope.local if layer.local_rope else meta.rope
            q = self._rope.rope_and_store(
                qkv, meta.positions, rope.cos, rope.sin, layer.k_cache, layer.v_cache,
                meta.slot_mapping, layer.num_heads, weights,
                q_norm.eps if q_norm is not None else 0.0, *scales)
        else:
            q, k, v = rotate_qk(qkv, layer.num_heads, layer.num_kv_heads,
                                *_cos_sin(layer, meta), q_norm, k_norm)
            attention.store_kv(k, v, layer.k_cache, layer.v_cache, meta.slot_mapping, *scales)
        nd = meta.num_decodes
        out = torch.empty_like(q)
        if nd:
            attention.decode_attention(q[:nd], layer.k_cache, layer.v_cache, meta.block_tables,
                                       meta.seq_lens, layer.scale, out=out[:nd],
                                       max_len=meta.max_decode_len or None, window=layer.window,
                                       k_scale=scales[0], v_scale=scales[1])
        if meta.prefills:
            attention.prefill_attention(
                q, layer.k_cache, layer.v_cache, meta.block_tables[nd:], meta.prefill_seqs,
                max(n for _, n, _ in meta.prefills), layer.scale, out, window=layer.window,
                k_scale=scales[0], v_scale=scales[1])
        return out.flatten(1)


class Attention(nn.Module):
    """One layer's attention and its slice of the KV cache (bound by the runner)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: TorchAttention | TritonAttention, scale: float | None = None,
                 window: int = 0, local_rope: bool = False, rotary: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window = window  # > 0: each query sees only its last `window` keys
        self.local_rope = local_rope  # rotary from the metadata's rope.local table
        self.rotary = rotary  # False: q and k as projected (granite-4.0-h's "nope" layers)
        self.backend = backend
        self.k_cache: torch.Tensor | None = None  # bound by the runner
        self.v_cache: torch.Tensor | None = None
        # An FP8 cache's scales, [kv_heads] float32 each (engine/kv_quant.py); None: 16-bit.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, qkv: torch.Tensor, meta: AttentionMetadata, q_norm=None,
                k_norm=None) -> torch.Tensor:
        """The merged QKV output [tokens, heads + 2 * kv_heads, d] -> [tokens, heads * d]: q and k
        normalised per head (when norms are given, as in Qwen3) and rotated, k and v stored."""
        return self.backend.forward(self, qkv, meta, q_norm, k_norm)
