"""Pooler: a pooling model's token states -> one vector (embed) or one score (score) per sequence.

Embeddings come back unnormalized (float32): normalizing and Matryoshka truncation are per
request (engine/pooling_output.py)."""

from __future__ import annotations

import torch

from tuili.models.pooling_config import PoolingConfig


class Pooler:
    def __init__(self, model: torch.nn.Module, config: PoolingConfig):
        self.model, self.config = model, config
        # decoders return the stream before their final norm; encoders their last states
        self.final_norm = getattr(model, "final_norm", None)
        self.classify = getattr(model, "classify", None)  # cross-encoders
        device = next(model.parameters()).device
        self.dense = [layer.to(device) for layer in config.dense]  # sentence-transformers Dense

    def __call__(self, hidden: torch.Tensor, seqs: list[tuple[int, int]]) -> torch.Tensor:
        """hidden [tokens, H], seqs (first row, tokens) of each whole sequence -> [seqs, D]
        embeddings, or [seqs] scores."""
        c = self.config
        if c.task == "score" and self.classify is not None:
            logits = self.classify(hidden[[row for row, _ in seqs]]).float()
            # one label: a relevance logit; several: the last label's probability
            return logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
        if c.task == "score" and c.score_token_ids is not None:  # a yes/no pair (Qwen3-Reranker)
            last = self.model.logits(hidden[[row + n - 1 for row, n in seqs]]).float()
            no, yes = c.score_token_ids
            return (last[:, yes] - last[:, no]).sigmoid()  # = softmax over (no, yes), yes's share
        pooled = self.embed(hidden, seqs)
        for layer in self.dense:
            pooled = layer(pooled)
        return pooled

    def embed(self, hidden: torch.Tensor, seqs: list[tuple[int, int]]) -> torch.Tensor:
        pooling = self.config.pooling
        if pooling in ("cls", "last"):
            rows = [row if pooling == "cls" else row + n - 1 for row, n in seqs]
            return self._normed(hidden[rows]).float()
        if len(seqs) == 1:
            row, n = seqs[0]
            return self._normed(hidden[row:row + n]).float().mean(0, keepdim=True)
        contiguous = all(a + n == b for (a, n), (b, _) in zip(seqs, seqs[1:]))
        rows = (slice(seqs[0][0], sum(seqs[-1])) if contiguous
                else torch.cat([torch.arange(row, row + n) for row, n in seqs]))
        states = self._normed(hidden[rows]).float()
        lens = torch.tensor([n for _, n in seqs], device=hidden.device)
        # output_size given: on the GPU, no wait for the lengths to learn the result's size
        segment = torch.repeat_interleave(torch.arange(len(seqs), device=hidden.device), lens,
                                          output_size=len(states))
        sums = states.new_zeros(len(seqs), states.shape[1]).index_add_(0, segment, states)
        return sums / lens[:, None]

    def _normed(self, states: torch.Tensor) -> torch.Tensor:
        return self.final_norm(states) if self.final_norm is not None else states
