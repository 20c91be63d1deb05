"""Plain-torch references of the quantized linears (triton_quant.py): dequantize, then matmul.
The CPU path of the quantized methods and the oracle of the kernels' tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 words -> [8R, C] 4-bit values: row 8r + j is bits 4j..4j+3 of word row r."""
    r, c = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(8 * r, c)


def unpack_rows_u8(packed: torch.Tensor) -> torch.Tensor:
    """unpack_rows as uint8, through the words' bytes (byte i of a little-endian word holds rows
    2i and 2i + 1): several times faster than shifting int32 words on CPU."""
    r, c = packed.shape
    b = packed.contiguous().view(torch.uint8).view(r, c, 4)
    pairs = torch.stack([b & 0xF, b >> 4], dim=-1)  # [r, c, 4, 2]
    return pairs.permute(0, 2, 3, 1).reshape(8 * r, c)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group: int) -> torch.Tensor:
    """The weight [N, K] in float32: w[n, k] = (q[k, n] - zeros[k // group, n]) * scales[...]."""
    q = unpack_rows_u8(qweight)
    g, n = scales.shape
    w = (q.view(g, group, n).float() - zeros.float()[:, None]) * scales.float()[:, None]
    return w.view(g * group, n).t()


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantize_int4(...).T (+ bias), in x's dtype."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group).to(x.dtype), bias)


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T (+ bias): int8 or FP8 weight [N, K], a scale per row."""
    w = weight.float() * scale.float()[:, None]
    return F.linear(x, w.to(x.dtype), bias)
