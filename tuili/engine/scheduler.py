"""Iteration-level scheduling: each step picks (request, new tokens) pairs under a token budget.

Order of service: running requests that decode (one token each), then running requests part-way
through a chunked prefill, then waiting requests in arrival order. When the pool runs out of
blocks, the most recently arrived running request is preempted: its blocks are freed and it
waits again, to be recomputed from its prompt and outputs so far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tuili.config import EngineConfig
from tuili.engine.kv_cache import KVCacheManager
from tuili.engine.request import PENDING, Request, Status


@dataclass
class Batch:
    """What one step computes: for each request, its next `num_new` tokens (decodes first)."""
    requests: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    num_decodes: int = 0

    def add(self, req: Request, n: int) -> None:
        self.requests.append(req)
        self.num_new.append(n)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = config.max_num_seqs
        self.budget = config.max_num_batched_tokens
        self.chunked = config.enable_chunked_prefill
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Take a finished (or aborted) request out of the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.budget
        decodes = [r for r in self.running
                   if r.num_tokens - r.num_computed_tokens == 1 and not self._at_limit(r)]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        preempted = False
        for group in (decodes, prefills):
            for req in group:
                if budget == 0:
                    break
                if req.status is not Status.RUNNING:  # preempted earlier in this loop
                    continue
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self._allocate_or_preempt(req, n, batch):
                    preempted = True
                    continue
                batch.add(req, n)
                budget -= n
            if group is decodes:
                batch.num_decodes = len(batch)
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _at_limit(self, req: Request) -> bool:
        """Whether the request's last token (maybe still on the device) is its final one: it
        waits to be finished, not to be computed."""
        max_tokens = req.params.max_tokens
        return req.num_tokens >= self.max_model_len or (
            max_tokens is not None and req.num_output_tokens >= max_tokens)

    def _allocate_or_preempt(self, req: Request, n: int, batch: Batch) -> bool:
        while not self.kv.allocate(req, n):
            victim = self.running[-1]
            if victim in batch.requests:  # only already-scheduled requests remain: give up
                victim = req
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = Status.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.token_ids[-1] == PENDING:  # just preempted; resumes once its token is read
                break
            self.kv.match_prefix(req)
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and self.chunked:
                n = budget
            if n > budget or not self.kv.allocate(req, n):
                self.kv.free(req)  # give back the prefix hits; try again next step
                break
            self.waiting.popleft()
            if req.status is Status.WAITING:  # first admission, not a resume
                self.kv.count_admission(req)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.add(req, n)
            budget -= n
