"""StepMask: a step's structured-output constraint as the sampler applies it (xgrammar's
bitmask; xgrammar itself is imported only when a request brings a constraint)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepMask:
    """`bitmask` [rows, ceil(V/32)] int32 on the logits' device (bit t of a row: token t is
    allowed; rows without a grammar allow everything) and the rows whose grammar allows nothing
    but a stop token: min_tokens must not ban it there."""
    bitmask: torch.Tensor
    only_stop_rows: set[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens' logits (float32) to -inf, in place, on their device."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=logits.shape[1])
