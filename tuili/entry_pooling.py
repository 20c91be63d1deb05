"""LLM's pooling calls: embed, score and rerank, each run to completion like generate()."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tuili.engine.pooling_output import PoolingRequestOutput
from tuili.errors import InvalidParameter
from tuili.pooling_params import PoolingParams
from tuili.scoring import pair_up, plan_scores, ranking


class PoolingCalls:
    """Mixed into LLM: needs self.engine, self.tokenizer and self._ids."""

    def encode(self, prompts: Sequence[str | list[int]],
               params: PoolingParams | Sequence[PoolingParams]) -> list[PoolingRequestOutput]:
        """Run pooling requests, batched; outputs in prompt order."""
        params = [params] * len(prompts) if isinstance(params, PoolingParams) else list(params)
        ids = [f"pool-{next(self._ids)}" for _ in prompts]
        prompts = self.tokenizer.encode_prompts(list(prompts))
        final: dict[str, PoolingRequestOutput] = {}
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    final[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in final:  # all or nothing: a bad prompt runs none of the batch
                    self.engine.abort_request(rid)
        return [final[rid] for rid in ids]

    def embed(self, texts: str | Sequence[str | list[int]], *, normalize: bool | None = None,
              dimensions: int | None = None) -> torch.Tensor:
        """Embeddings [len(texts), D] (float32); normalize=None takes the model's default."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InvalidParameter("texts", "is empty; give at least one text")
        outs = self.encode(texts, PoolingParams("embed", normalize, dimensions))
        return torch.stack([o.data for o in outs])

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[float]:
        """A relevance score per pair (one text with many, or many with as many)."""
        plan = plan_scores(self.engine.task, self._cross_encoder, self.tokenizer,
                           pair_up(text_1, text_2))
        outs = self.encode(plan.prompts, plan.params)
        return plan.scores([o.data for o in outs])

    def rerank(self, query: str, documents: Sequence[str],
               top_n: int | None = None) -> list[tuple[int, float]]:
        """(document index, score) pairs, best first."""
        if not documents:
            raise InvalidParameter("documents", "is empty; give at least one document")
        scores = self.score(query, list(documents))
        return [(i, scores[i]) for i in ranking(scores, top_n)]

    @property
    def _cross_encoder(self) -> bool:
        return hasattr(self.engine.runner.model, "classify")
