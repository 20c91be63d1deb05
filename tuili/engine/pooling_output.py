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
        """The finished requests' outputs, from their rows of the Pooler's output."""
        pooled = pooled.cpu()
        outs = []
        for req, data in zip(requests, pooled):
            if self.requests.pop(req.request_id, None) is None:  # aborted meanwhile
                continue
            p = req.pooling
            if p.task == "embed":
                if p.dimensions is not None:
                    data = data[: p.dimensions]
                normalize = self.normalize_default if p.normalize is None else p.normalize
                if normalize:  # after truncating: Matryoshka dimensions are renormalized
                    data = F.normalize(data, dim=-1)
            outs.append(PoolingRequestOutput(req.request_id, req.prompt_token_ids, data))
        return outs
