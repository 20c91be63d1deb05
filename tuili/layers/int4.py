"""4-bit weights kept packed: groups of 32 along the input dimension, w = (q - 8) * scale + zero.

GGUF's Q4_0, Q4_1 and Q4_K blocks all reduce to this form exactly (up to bf16 scales), so a 4-bit
GGUF runs on torch's int4 CPU kernel without re-quantizing: a quarter of bf16's bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


@dataclass
class Int4Weight:
    q: torch.Tensor  # [N, K] int32 in 0..15
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        s = self.scale.repeat_interleave(GROUP, dim=1)
        z = self.zero.repeat_interleave(GROUP, dim=1)
        return (self.q.float() - 8) * s + z

    def narrow(self, dim: int, start: int, length: int) -> Int4Weight:
        """Rows (dim 0), or columns (dim 1) in whole groups of 32, still packed."""
        if dim == 0:
            return Int4Weight(*(t.narrow(0, start, length) for t in (self.q, self.scale, self.zero)))
        if start % GROUP or length % GROUP:
            raise ValueError(f"columns {start}..{start + length} are not whole groups of {GROUP}")
        g0, gn = start // GROUP, length // GROUP
        return Int4Weight(self.q.narrow(1, start, length), self.scale.narrow(1, g0, gn),
                          self.zero.narrow(1, g0, gn))

    def permute_rows(self, fn) -> Int4Weight:
        return Int4Weight(fn(self.q), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        return Int4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")))


def supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales-and-zeros) in the layout torch's int4 CPU kernel reads."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.contiguous(), 1)
    scales_zeros = torch.stack([w.scale.t(), w.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_zeros


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                group: int = GROUP) -> torch.Tensor:
    """x [M, K] bf16 @ dequantized(packed).T -> [M, N] bf16 (groups of `group` along K)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)
