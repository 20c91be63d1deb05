"""The residual stream between a decoder's layers, in the form the step's kernels want it.

A layer reads the stream through a norm into a projection (`project`) and adds a projection's
output back (`add`). Two forms, picked per step by the backend (`Backend.fuses`):
- SplitStream: x + residual, the add deferred into the next norm (the fused add + RMSNorm kernel).
- FusedStream (decode on the GPU): x whole; each norm is the next projection's GEMV prologue,
  scaled by the sums of squares the GEMV that wrote x left (None: the prologue sums x itself),
  and each add is a GEMV epilogue.
"""

from __future__ import annotations

import torch

from tuili.layers.backend import Backend
from tuili.layers.linear import Linear
from tuili.layers.norm import RMSNorm


def stream(backend: Backend, x: torch.Tensor) -> SplitStream | FusedStream:
    """The stream of embeddings x, in the form its step's rows take."""
    return FusedStream(backend, x) if backend.fuses(x) else SplitStream(backend, x)


class SplitStream:
    __slots__ = ("backend", "x", "residual", "keep", "sumsq")

    def __init__(self, backend: Backend, x: torch.Tensor | None,
                 residual: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        self.backend, self.x, self.residual, self.keep = backend, x, residual, keep
        self.sumsq = None

    def project(self, norm: RMSNorm, layer: Linear, gated: bool = False,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, SplitStream]:
        """(layer(norm(stream)) (silu-and-mul'ed if gated), the stream). keep: the rows of the
        stream that the next `add` keeps (the last layer's sampled rows)."""
        if self.residual is None:
            residual, h = self.x, norm(self.x)
        else:
            h, residual = norm(self.x, self.residual)
        return self.backend.linear(h, layer, gated=gated), SplitStream(self.backend, None,
                                                                      residual, keep)

    def add(self, layer: Linear, h: torch.Tensor) -> SplitStream:
        """The stream (its kept rows) + layer(h)."""
        out = self.backend.linear(h, layer)
        residual = self.residual if self.keep is None else self.residual.index_select(0, self.keep)
        return SplitStream(self.backend, out, residual)

    def normed(self, norm: RMSNorm) -> tuple[torch.Tensor, SplitStream]:
        """(norm(stream), the stream) for a block that is no single Linear (a MoE block)."""
        if self.residual is None:
            return norm(self.x), SplitStream(self.backend, None, self.x)
        h, residual = norm(self.x, self.residual)
        return h, SplitStream(self.backend, None, residual)

    def plus(self, out: torch.Tensor) -> SplitStream:
        """The stream + out (the add deferred into the next norm)."""
        return SplitStream(self.backend, out, self.residual)

    def hidden(self) -> torch.Tensor:
        return self.x if self.residual is None else self.x + self.residual


class FusedStream:
    __slots__ = ("backend", "x", "sumsq")

    def __init__(self, backend: Backend, x: torch.Tensor, sumsq: torch.Tensor | None = None):
        self.backend, self.x, self.sumsq = backend, x, sumsq

    def project(self, norm: RMSNorm, layer: Linear, gated: bool = False,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, FusedStream]:
        kept = self.x if keep is None else self.x.index_select(0, keep)
        h = self.backend.linear(self.x, layer, norm=norm, norm_sumsq=self.sumsq, gated=gated)
        return h, FusedStream(self.backend, kept)

    def add(self, layer: Linear, h: torch.Tensor) -> FusedStream:
        out, sumsq = self.backend.linear(h, layer, residual=self.x, want_sumsq=True)
        return FusedStream(self.backend, out, sumsq)

    def normed(self, norm: RMSNorm) -> tuple[torch.Tensor, FusedStream]:
        return norm(self.x), self

    def plus(self, out: torch.Tensor) -> FusedStream:
        return FusedStream(self.backend, self.x + out)  # no sums of squares: the next norm sums

    def hidden(self) -> torch.Tensor:
        return self.x
