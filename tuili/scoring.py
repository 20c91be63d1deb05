"""Scores of (query, document) pairs from pooling requests, shared by LLM.score/rerank and the
server's /v1/score and /v1/rerank: which requests a call makes, and how their outputs combine.

Three kinds of scorer: a cross-encoder (BertForSequenceClassification) reads each pair as one
sequence with token types; a decoder with a yes/no token pair reads each pair as one prompt; an
embedding model embeds queries and documents apart and scores by cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.errors import InvalidParameter
from tuili.models.tokenizer import Tokenizer
from tuili.pooling_params import PoolingParams

# How a decoder scorer sees a pair (the layout of Qwen3-Reranker's prompt body).
DECODER_PAIR = "<Query>: {query}\n<Document>: {document}"


def pair_up(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one and N -> N pairs with the one; N and N -> N pairs in order."""
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    if not first or not second:
        raise InvalidParameter("text_1" if not first else "text_2", "is empty; give some text")
    if len(first) == 1:
        first = first * len(second)
    elif len(second) == 1:
        second = second * len(first)
    if len(first) != len(second):
        raise InvalidParameter("text_2", f"has {len(second)} texts for {len(first)} in text_1; "
                                         "give one, or as many")
    for name, texts in (("text_1", first), ("text_2", second)):
        if any(not t for t in texts):
            raise InvalidParameter(name, "has an empty text")
    return list(zip(first, second))


@dataclass
class ScorePlan:
    """The pooling requests (prompt ids, params) a score call makes; with `pairs`, the requests
    are embeddings and pair i scores cosine(outputs[pairs[i][0]], outputs[pairs[i][1]])."""
    prompts: list[list[int]]
    params: list[PoolingParams]
    pairs: list[tuple[int, int]] | None = None

    def scores(self, outputs: list[torch.Tensor]) -> list[float]:
        if self.pairs is None:
            return [float(o) for o in outputs]
        return [float(torch.dot(outputs[a], outputs[b])) for a, b in self.pairs]


def plan_scores(task: str, cross_encoder: bool, tokenizer: Tokenizer,
                pairs: list[tuple[str, str]]) -> ScorePlan:
    """The requests scoring `pairs` takes on a model serving `task` (it tokenizes: off the event
    loop in the server)."""
    if task == "embed":  # a bi-encoder: each distinct text embedded once, normalized
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        row = {t: i for i, t in enumerate(texts)}
        params = PoolingParams(task="embed", normalize=True)
        return ScorePlan([tokenizer.encode(t) for t in texts], [params] * len(texts),
                         [(row[q], row[d]) for q, d in pairs])
    if cross_encoder:
        encoded = [tokenizer.encode_pair(q, d) for q, d in pairs]
        params = [PoolingParams(task="score", token_type_ids=types) for _, types in encoded]
        return ScorePlan([ids for ids, _ in encoded], params)
    prompts = [tokenizer.encode(DECODER_PAIR.format(query=q, document=d)) for q, d in pairs]
    return ScorePlan(prompts, [PoolingParams(task="score")] * len(prompts))


def ranking(scores: list[float], top_n: int | None) -> list[int]:
    """Document indices, best score first (ties: in the order given), the first top_n."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n is not None else order
