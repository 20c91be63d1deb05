"""PoolingParams: what a pooling request (an embedding or a score) asks of the engine."""

from __future__ import annotations

from dataclasses import dataclass

from tuili.errors import InvalidParameter

POOLING_TASKS = ("embed", "score")


@dataclass
class PoolingParams:
    """task: "embed" (a vector) or "score" (a relevance score); normalize: None takes the model's
    default; dimensions: keep the first d (Matryoshka) and renormalize; token_type_ids: a
    cross-encoder pair's segments, one per prompt token."""
    task: str = "embed"
    normalize: bool | None = None
    dimensions: int | None = None
    token_type_ids: list[int] | None = None
    n = 1  # one output per request, as SamplingParams(n=1): admission counts it so

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise InvalidParameter("task", f"got {self.task!r}, must be one of "
                                           f"{', '.join(POOLING_TASKS)}")
        d = self.dimensions
        if d is not None and (type(d) is not int or d < 1):
            raise InvalidParameter("dimensions", f"got {d!r}, must be an integer >= 1")
