"""Pooler: a pooling model's token states -> one vector (embed) or one score (score) per sequence.

Embeddings come back unnormalized (float32): normalizing and Matryoshka truncation are per
request (engine/pooling_output.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuili.models.pooling_config import PoolingConfig


@dataclass
class PooledRows:
    """Where a step's pooled sequences lie in its hidden rows, as device tensors: each one's
    first row and length, and for mean pooling the rows to gather (None: all, in order) and the
    sequence of each gathered row."""
    first: torch.Tensor  # [seqs]
    lens: torch.Tensor  # [seqs]
    seq_index: torch.Tensor  # [gathered rows]
    rows: torch.Tensor | None = None

    @classmethod
    def build(cls, seqs: list[tuple[int, int]], num_rows: int, device: torch.device
              ) -> PooledRows:
        """From (first row, length) of each sequence, in one host buffer and one copy."""
        first = np.fromiter((row for row, _ in seqs), np.int64, len(seqs))
        lens = np.fromiter((n for _, n in seqs), np.int64, len(seqs))
        seq_index = np.repeat(np.arange(len(seqs)), lens)
        parts = [first, lens, seq_index]
        every = int(lens.sum()) == num_rows and all(a + n == b for (a, n), (b, _)
                                                     in zip(seqs, seqs[1:])) and first[0] == 0
        if not every:  # the rows of each sequence, in order
            parts.append(np.arange(len(seq_index)) - (np.cumsum(lens) - lens)[seq_index] +
                         first[seq_index])
        host = torch.from_numpy(np.concatenate(parts))  # not awaited: see engine/transfer.py
        index = host.to(device, non_blocking=True).split(
            [len(seqs), len(seqs)] + [len(seq_index)] * (len(parts) - 2))
        return cls(*index)


class Pooler:
    def __init__(self, model: torch.nn.Module, config: PoolingConfig):
        self.model, self.config = model, config
        # decoders return the stream before their final norm; encoders their last states
        self.final_norm = getattr(model, "final_norm", None)
        self.classify = getattr(model, "classify", None)  # cross-encoders
        device = next(model.parameters()).device
        self.dense = [layer.to(device) for layer in config.dense]  # sentence-transformers Dense

    def __call__(self, hidden: torch.Tensor, seqs: PooledRows) -> torch.Tensor:
        """hidden [tokens, H], the pooled sequences' rows in it -> [seqs, D] embeddings, or
        [seqs] scores. A few kernels for the whole batch, whatever its size."""
        c = self.config
        if c.task == "score" and self.classify is not None:
            logits = self.classify(hidden.index_select(0, seqs.first)).float()
            # one label: a relevance logit; several: the last label's probability
            return logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
        if c.task == "score" and c.score_token_ids is not None:  # a yes/no pair (Qwen3-Reranker)
            last = self.model.logits(hidden.index_select(0, seqs.first + seqs.lens - 1)).float()
            no, yes = c.score_token_ids
            return (last[:, yes] - last[:, no]).sigmoid()  # = softmax over (no, yes), yes's share
        pooled = self.embed(hidden, seqs)
        for layer in self.dense:
            pooled = layer(pooled)
        return pooled

    def embed(self, hidden: torch.Tensor, seqs: PooledRows) -> torch.Tensor:
        pooling = self.config.pooling
        if pooling in ("cls", "last"):
            rows = seqs.first if pooling == "cls" else seqs.first + seqs.lens - 1
            return self._normed(hidden.index_select(0, rows)).float()
        states = hidden if seqs.rows is None else hidden.index_select(0, seqs.rows)
        states = self._normed(states)
        if len(seqs.first) == 1:
            return states.mean(0, keepdim=True, dtype=torch.float32)
        sums = states.new_zeros(len(seqs.first), states.shape[1], dtype=torch.float32)
        return sums.index_add_(0, seqs.seq_index, states.float()) / seqs.lens[:, None]

    def _normed(self, states: torch.Tensor) -> torch.Tensor:
        return self.final_norm(states) if self.final_norm is not None else states
