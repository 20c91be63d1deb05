"""Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
n tokens (n from prompt_lookup_max down to prompt_lookup_min) are the guess. No second model."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tuili.engine.request import Request
from tuili.engine.spec_decode.draft import Draft


def lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest suffix found."""
    length = len(tokens)
    if length < n_min + 1 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # windows starting at 0 .. length - n - 1: each ends before the suffix itself starts
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


class NgramProposer:
    """Proposals from each request's own prompt and output."""

    def __init__(self, k: int, n_min: int, n_max: int):
        self.k, self.n_min, self.n_max = k, n_min, n_max

    def propose(self, reqs: list[Request], caps: list[int]) -> list[Draft | None]:
        out = []
        for req, cap in zip(reqs, caps):
            tokens = lookup(req.token_ids, min(self.k, cap), self.n_min, self.n_max)
            out.append(Draft(tokens) if tokens else None)
        return out

    def release(self, req: Request) -> None:
        """Nothing is kept per request."""
