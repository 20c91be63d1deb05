"""Bidirectional attention over a flat batch of whole sequences, for encoders: no KV cache.

Linear layers see the flat, unpadded tokens. On the GPU attention lays the sequences out padded
to the longest ([seqs, heads, longest, d] with an additive key mask) and one SDPA call
(memory-efficient attention) attends them all;
on the CPU each sequence gets its own unmasked SDPA call over a contiguous copy of its q, k, v
(no padding to fill, copy in and gather out, and no mask: at 64 texts of 6-70 tokens this was
1.6x (float32) to 1.9x (bfloat16) faster than the padded call, measured on a loaded 2-core VM).

A batch's whole layout (ids, positions, types, rows per sequence, padded places) is built on the
host and sent in one copy: an embedding call of 64 texts issues a handful of ops outside the
forward, not a few per text (BENCHMARKS.md, seventeenth session).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels here: not cuDNN's, which builds a plan for each new shape (texts, longest): on an
# H100 a first pass over 256 texts ran at 53 emb/s one by one and 176 in batches of 64, later
# passes at ~330 and ~6,600 (BENCHMARKS.md, sixteenth session). Flash attention takes the
# unmasked calls, memory-efficient attention the masked one.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Mem-efficient SDPA wants its mask's rows aligned to 16 elements; a bool mask, or one unaligned,
# it converts (and pads) again in every layer: a few kernels a layer on the GPU.
_MASK_ALIGN = 16


@dataclass
class EncoderMetadata:
    positions: torch.Tensor  # [tokens] position of each token in its sequence
    seq_lens: list[int]  # every sequence is whole: its rows follow the previous one's
    token_type_ids: torch.Tensor | None = None  # [tokens] segment of each token (pairs)
    # Set when there are several sequences (on the GPU): each flat row's place in the padded
    # layout, and the additive key mask [seqs, 1, 1, longest] (0: a real token, -inf: padding).
    padded_rows: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    seq_index: torch.Tensor | None = None  # [tokens] the sequence of each row
    first_rows: torch.Tensor | None = None  # [seqs] each sequence's first row
    lens: torch.Tensor | None = None  # [seqs] its length
    # Copy each sequence's q, k, v contiguous before its SDPA call (the CPU's choice, above);
    # on the GPU one sequence attends views of the projection (4 fewer kernels a layer).
    contiguous: bool = True

    @classmethod
    def build(cls, seqs: list[list[int]], device: torch.device, dtype: torch.dtype,
              token_type_ids: list[list[int]] | None = None, padded: bool | None = None
              ) -> tuple[torch.Tensor, EncoderMetadata]:
        """(input ids [tokens], metadata) of whole sequences laid flat, from one host buffer and
        one copy to the device. padded: attend in the padded layout (default: on the GPU, with
        several sequences)."""
        count, seq_lens = len(seqs), [len(ids) for ids in seqs]
        padded = device.type != "cpu" and count > 1 if padded is None else padded
        tokens, longest = sum(seq_lens), max(seq_lens)
        stride = -(-longest // _MASK_ALIGN) * _MASK_ALIGN
        host = (_one_layout(seqs[0], token_type_ids) if count == 1 and not padded
                else _layout(seqs, seq_lens, token_type_ids, padded, stride))
        on_device = host.to(device, non_blocking=True) if device.type != "cpu" else host
        sizes = [tokens, tokens, tokens, count, count]
        sizes += [tokens] * ((token_type_ids is not None) + 2 * padded)
        ids, positions, seq_index, starts, lens, *rest = on_device.split(sizes)
        types = rest.pop(0) if token_type_ids is not None else None
        meta = cls(positions, seq_lens, types, seq_index=seq_index, first_rows=starts, lens=lens,
                   contiguous=device.type == "cpu")
        if padded:
            meta.padded_rows, mask_rows = rest
            mask = torch.full((count, stride), float("-inf"), dtype=dtype, device=device)
            mask.view(-1).index_fill_(0, mask_rows, 0)
            meta.key_mask = mask[:, None, None, :longest]
        return ids, meta


def _layout(seqs: list[list[int]], seq_lens: list[int], token_type_ids: list[list[int]] | None,
            padded: bool, stride: int) -> torch.Tensor:
    """The host buffer: ids, positions, each row's sequence, each sequence's first row and length,
    [token types], [rows in the padded layout, real tokens' places in the mask]."""
    lens = np.array(seq_lens, np.int64)
    starts = np.cumsum(lens) - lens
    seq_index = np.repeat(np.arange(len(seqs)), lens)
    positions = np.arange(len(seq_index)) - starts[seq_index]
    parts = [_flat(seqs), positions, seq_index, starts, lens]
    if token_type_ids is not None:
        parts.append(_flat(token_type_ids))
    if padded:
        parts += [seq_index * int(lens.max()) + positions, seq_index * stride + positions]
    return torch.from_numpy(np.concatenate(parts))


def _one_layout(ids: list[int], token_type_ids: list[list[int]] | None) -> torch.Tensor:
    """_layout of one unpadded sequence, without numpy's per-call costs (~10 us of a call of one)."""
    n = len(ids)
    host = array("q", ids)
    host.extend(range(n))
    host.extend([0] * n)
    host.extend((0, n))
    if token_type_ids is not None:
        host.extend(token_type_ids[0])
    return torch.frombuffer(host, dtype=torch.int64)


def _flat(rows: list[list[int]]) -> np.ndarray:
    flat = []
    for row in rows:
        flat.extend(row)
    return np.frombuffer(array("q", flat), np.int64)


def sdpa_backends():
    """The context encoder_attention runs in (entered once per forward: ~30 us a call)."""
    return sdpa_kernel(_BACKENDS)


def encoder_attention(qkv: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
    """qkv [tokens, 3, heads, d] -> [tokens, heads * d], each sequence attending to itself.
    Run inside sdpa_backends()."""
    tokens, _, heads, d = qkv.shape
    if meta.padded_rows is None:  # each sequence alone: no padding, no mask
        if len(meta.seq_lens) == 1 and not meta.contiguous:  # SDPA on views of qkv, no copies
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv.unbind(1)))
            return o[0].transpose(0, 1).reshape(tokens, heads * d)
        out = qkv.new_empty(tokens, heads, d)
        start = 0
        for n in meta.seq_lens:
            end = start + n
            o = F.scaled_dot_product_attention(
                *(t.transpose(0, 1)[None].contiguous() for t in qkv[start:end].unbind(1)))
            out[start:end] = o[0].transpose(0, 1)
            start = end
        return out.view(tokens, heads * d)
    seqs, longest = len(meta.seq_lens), meta.key_mask.shape[-1]
    # q, k and v padded in one copy: views [seqs, heads, longest, d] of it
    padded = qkv.new_zeros(seqs * longest, 3, heads, d)
    padded.index_copy_(0, meta.padded_rows, qkv)
    q, k, v = padded.view(seqs, longest, 3, heads, d).transpose(1, 3).unbind(2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.key_mask)
    out = out.transpose(1, 2).reshape(seqs * longest, heads * d)
    return out.index_select(0, meta.padded_rows)
