"""Bidirectional attention over a flat batch of whole sequences, for encoders: no KV cache.

Linear layers see the flat, unpadded tokens. On the GPU attention lays the sequences out padded
to the longest ([seqs, heads, longest, d] with a key mask) and one SDPA call (memory-efficient
attention) attends them all;
on the CPU each sequence gets its own unmasked SDPA call over a contiguous copy of its q, k, v
(no padding to fill, copy in and gather out, and no mask: at 64 texts of 6-70 tokens this was
1.6x (float32) to 1.9x (bfloat16) faster than the padded call, measured on a loaded 2-core VM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels here: not cuDNN's, which builds a plan for each new shape (texts, longest): on an
# H100 a first pass over 256 texts ran at 53 emb/s one by one and 176 in batches of 64, later
# passes at ~330 and ~6,600 (BENCHMARKS.md, sixteenth session). Flash attention takes the
# unmasked calls, memory-efficient attention the masked one.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class EncoderMetadata:
    positions: torch.Tensor  # [tokens] position of each token in its sequence
    seq_lens: list[int]  # every sequence is whole: its rows follow the previous one's
    token_type_ids: torch.Tensor | None = None  # [tokens] segment of each token (pairs)
    # Set when there are several sequences: each flat row's place in the padded layout, and
    # the key mask [seqs, 1, 1, longest] (True: a real token).
    padded_rows: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device,
              token_type_ids: list[int] | None = None) -> EncoderMetadata:
        positions = torch.cat([torch.arange(n) for n in seq_lens]) if len(seq_lens) > 1 else \
            torch.arange(seq_lens[0])
        types = torch.tensor(token_type_ids) if token_type_ids is not None else None
        meta = cls(positions.to(device), seq_lens, None if types is None else types.to(device))
        if len(seq_lens) > 1 and device.type != "cpu":
            longest = max(seq_lens)
            lens = torch.tensor(seq_lens)
            starts = torch.arange(len(seq_lens)) * longest
            meta.padded_rows = (torch.repeat_interleave(starts, lens) + positions).to(device)
            mask = torch.arange(longest)[None, :] < lens[:, None]
            meta.key_mask = mask[:, None, None, :].to(device)
        return meta


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      meta: EncoderMetadata) -> torch.Tensor:
    """q, k, v [tokens, heads, d] -> [tokens, heads * d], each sequence attending to itself."""
    with sdpa_kernel(_BACKENDS):
        return _attend(q, k, v, meta)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            meta: EncoderMetadata) -> torch.Tensor:
    tokens, heads, d = q.shape
    if meta.padded_rows is None:  # each sequence alone: no padding, no mask
        out = q.new_empty(tokens, heads, d)
        start = 0
        for n in meta.seq_lens:
            end = start + n
            o = F.scaled_dot_product_attention(
                *(t[start:end].transpose(0, 1)[None].contiguous() for t in (q, k, v)))
            out[start:end] = o[0].transpose(0, 1)
            start = end
        return out.view(tokens, heads * d)
    seqs, longest = len(meta.seq_lens), meta.key_mask.shape[-1]

    def padded(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(seqs * longest, heads, d)
        out.index_copy_(0, meta.padded_rows, t)
        return out.view(seqs, longest, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=meta.key_mask)
    out = out.transpose(1, 2).reshape(seqs * longest, heads * d)
    return out.index_select(0, meta.padded_rows)
