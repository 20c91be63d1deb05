"""Draft: one request's guessed tokens for a verify step, and the distribution each was drawn
from (None: chosen deterministically, as n-gram lookup does, i.e. probability 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), vocab] float32, on the target's device

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        if self.probs is not None:
            self.probs = self.probs[:n]
