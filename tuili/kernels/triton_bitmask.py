"""Structured output's token mask on the GPU: each row's disallowed tokens' logits set to -inf,
from a bitmask [rows, ceil(V / 32)] int32 (bit t % 32 of word t // 32 set: token t is allowed;
xgrammar's layout). One launch, no host reads, so a CUDA graph can hold it.
Reference: tuili.kernels.reference.apply_bitmask."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_bitmask_kernel(logits_ptr, mask_ptr, V, stride_logits, stride_mask,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    words = tl.load(mask_ptr + row.to(tl.int64) * stride_mask + cols // 32, mask=inside,
                    other=-1)
    banned = ((words >> (cols % 32)) & 1) == 0
    ninf = tl.full((BLOCK,), float("-inf"), tl.float32)
    tl.store(logits_ptr + row.to(tl.int64) * stride_logits + cols,
             ninf.to(logits_ptr.dtype.element_ty), mask=inside & banned)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [rows, V] (any float dtype, rows contiguous) -inf where bitmask
    [rows, >= ceil(V / 32)] int32 has the token's bit clear."""
    rows, vocab = logits.shape
    if bitmask.shape[0] != rows or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits "
                         f"{tuple(logits.shape)}")
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("logits and bitmask rows must be contiguous")
    if rows:
        _apply_bitmask_kernel[(rows, triton.cdiv(vocab, BLOCK))](
            logits, bitmask, vocab, logits.stride(0), bitmask.stride(0), BLOCK=BLOCK)
