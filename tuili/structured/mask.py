"""StepMask: a step's structured-output constraint as the sampler applies it (xgrammar's
bitmask layout), by the Triton kernel on the GPU (also inside the sampling CUDA graphs,
engine/cuda_graphs.py) and its torch reference on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.kernels import on_gpu, reference, triton_module


@dataclass
class StepMask:
    """`bitmask` [rows, ceil(V/32)] int32 on the logits' device (bit t of a row: token t is
    allowed; rows without a grammar allow everything) and the rows whose grammar allows nothing
    but a stop token: min_tokens must not ban it there."""
    bitmask: torch.Tensor
    only_stop_rows: set[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens' logits to -inf, in place, on their device."""
        if on_gpu(logits):
            triton_module("triton_bitmask").apply_bitmask(logits, self.bitmask)
        else:
            reference.apply_bitmask(logits, self.bitmask)
