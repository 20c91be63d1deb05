"""Bidirectional attention over a flat batch of whole sequences, for encoders: no KV cache.

Linear layers see the flat, unpadded tokens. On the GPU attention lays the sequences out padded
to the longest ([seqs, heads, longest, d] with a key mask) and one SDPA call (memory-efficient
attention) attends them all;
on the CPU each sequence gets its own unmasked SDPA call over a contiguous copy of its q, k, v
(no padding to fill, copy in and gather out, and no mask: at 64 texts of 6-70 tokens this was
1.6x (float32) to 1.9x (bfloat16) faster than the padded call, measured on a loaded 2-core VM).
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

    @classmethod
    def build(cls, seqs: list[list[int]], device: torch.device, dtype: torch.dtype,
              token_type_ids: list[list[int]] | None = None, padded: bool | None = None
              ) -> tuple[torch.Tensor, EncoderMetadata]:
        """(input ids [tokens], metadata) of whole sequences laid flat, from one host buffer and
        one copy to the device. padded: attend in the padded layout (default: on the GPU, with
        several sequences)."""
        lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
        starts = np.cumsum(lens) - lens
        tokens, count = int(starts[-1] + lens[-1]), len(seqs)
        seq_index = np.repeat(np.arange(count), lens)
        positions = np.arange(tokens) - starts[seq_index]
        flat = []
        for ids in seqs:
            flat.extend(ids)
        parts = [np.frombuffer(array("q", flat), np.int64), positions, seq_index, starts, lens]
        if token_type_ids is not None:
            flat = []
            for types in token_type_ids:
                flat.extend(types)
            parts.append(np.frombuffer(array("q", flat), np.int64))
        padded = device.type != "cpu" and count > 1 if padded is None else padded
        longest = int(lens.max())
        stride = -(-longest // _MASK_ALIGN) * _MASK_ALIGN
        if padded:  # rows in the padded layout, then the real tokens' places in the mask
            parts += [seq_index * longest + positions, seq_index * stride + positions]
        host = torch.from_numpy(np.concatenate(parts))
        on_device = host.to(device, non_blocking=True) if device.type != "cpu" else host
        ids, positions, seq_index, starts, lens_t, *rest = on_device.split(
            [tokens, tokens, tokens, count, count] + [tokens] * (len(parts) - 5))
        types = rest.pop(0) if token_type_ids is not None else None
        meta = cls(positions, [int(n) for n in lens], types, seq_index=seq_index,
                   first_rows=starts, lens=lens_t)
        if padded:
            meta.padded_rows, mask_rows = rest
            mask = torch.full((count, stride), float("-inf"), dtype=dtype, device=device)
            mask.view(-1).index_fill_(0, mask_rows, 0)
            meta.key_mask = mask[:, None, None, :longest]
        return ids, meta


def sdpa_backends():
    """The context encoder_attention runs in (entered once per forward: ~30 us a call)."""
    return sdpa_kernel(_BACKENDS)


def encoder_attention(qkv: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
    """qkv [tokens, 3, heads, d] -> [tokens, heads * d], each sequence attending to itself.
    Run inside sdpa_backends()."""
    tokens, _, heads, d = qkv.shape
    if meta.padded_rows is None:  # each sequence alone: no padding, no mask
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
