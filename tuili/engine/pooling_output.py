"""The output processor of pooling requests: each finishes in the step that computes it, with
its embedding (normalized, truncated to the dimensions asked) or score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuili.engine.request import Request


@dataclass
class PoolingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    data: torch.Tensor  # an embedding [D] (float32, CPU) or a score []
    finished: bool = True

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()

    @property
    def score(self) -> float:
        return float(self.data)


class PoolingOutputProcessor:
    def __init__(self, normalize_default: bool):
        self.normalize_default = normalize_default
        self.requests: dict[str, Request] = {}

    def is_running(self, request_id: str) -> bool:
        return request_id in self.requests

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> list[Request]:
        req = self.requests.pop(request_id, None)
        return [req] if req is not None and not req.is_finished else []

    def outputs(self, requests: list[Request], pooled: torch.Tensor) -> list[PoolingRequestOutput]:
        """The finished requests' outputs, from their rows of the Pooler's output: one copy to the
        host, and one truncation and normalization for each kind of embedding request."""
        pooled = pooled.cpu()
        rows = self._finish_embeddings(requests, pooled) if pooled.dim() == 2 else pooled
        outs = []
        for req, data in zip(requests, rows):
            if self.requests.pop(req.request_id, None) is not None:  # else aborted meanwhile
                outs.append(PoolingRequestOutput(req.request_id, req.prompt_token_ids, data))
        return outs

    def _finish_embeddings(self, requests: list[Request], pooled: torch.Tensor) -> list:
        """Each row truncated to its request's dimensions, then normalized if it asks (after
        truncating: Matryoshka dimensions are renormalized); requests alike done together."""
        kinds: dict[tuple[int | None, bool], list[int]] = {}
        for i, req in enumerate(requests):
            p = req.pooling
            normalize = self.normalize_default if p.normalize is None else p.normalize
            kinds.setdefault((p.dimensions, normalize), []).append(i)
        if len(kinds) == 1:
            return list(_finish(pooled, *next(iter(kinds))))
        rows = [None] * len(requests)
        for (dimensions, normalize), index in kinds.items():
            for i, row in zip(index, _finish(pooled[index], dimensions, normalize)):
                rows[i] = row
        return rows


def _finish(rows: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    rows = rows[:, :dimensions] if dimensions is not None else rows
    return F.normalize(rows, dim=-1) if normalize else rows
