"""4-bit values in int32 words, eight per word, the lowest nibble first.

GPTQ packs its weight along the input dimension (word r of a column holds rows 8r..8r+7) and its
zero points along the output dimension; AWQ packs both along the output dimension, interleaved
(nibble j of a word holds column AWQ_ORDER[j] of its eight)."""

from __future__ import annotations

import torch

from tuili.kernels.reference_quant import unpack_rows

__all__ = ["AWQ_ORDER", "pack_rows", "unpack_cols", "unpack_rows"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SHIFTS = tuple(range(0, 32, 4))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., 8]: nibble j of each word (the int32's sign bit is just bit 31)."""
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] words -> [R, 8C] values: column 8c + order[j] is nibble j of word column c."""
    values = _nibbles(packed)
    if order is not None:
        values = values[..., list(_inverse(order))]
    return values.reshape(packed.shape[0], -1)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[K, N] values in 0..15 -> [K/8, N] int32 words (the inverse of unpack_rows)."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"{k} rows do not pack into 8-value words")
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=q.device).view(1, 8, 1)
    words = (q << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for j, column in enumerate(order):
        inv[column] = j
    return tuple(inv)
