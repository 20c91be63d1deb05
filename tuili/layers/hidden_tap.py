"""HiddenTap: hidden states a decoder's forward hands out beside its output, for EAGLE draft heads
(engine/spec_decode/eagle.py). A model with no tap set (the default) computes nothing extra."""

from __future__ import annotations

import torch


class HiddenTap:
    """`layers`: the layer indices whose input stream (the residual sum) is taken, in order; the
    index num_layers means the last layer's output after the final norm; none, for a model that
    sets `hidden` itself (an EAGLE head: its output states). After each forward,
    `hidden` holds the taken states of every row side by side [tokens, len(layers) * hidden]."""

    def __init__(self, layers: list[int]):
        self.layers = tuple(layers)
        self.hidden: torch.Tensor | None = None

    def take(self, states: list[torch.Tensor]) -> None:
        self.hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
