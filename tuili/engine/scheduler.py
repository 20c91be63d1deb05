"""Iteration-level scheduling: each step picks (request, new tokens) pairs under a token budget,
and applies the step's sampled tokens once they are read back (`update`).

Order of service: running requests that decode (one token each), then running requests part-way
through a chunked prefill, then waiting requests in arrival order. When the pool runs out of
blocks, the most recently arrived running request is preempted: its blocks are freed and it
waits again, to be recomputed from its prompt and outputs so far.

A pooling request (embed, score) is one prefill scheduled whole (an encoder attends to all of it
at once; mean pooling wants every row): it shares the token budget, skips the prefix cache, and
the engine finishes it, freeing its blocks, in the step that computes it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuili.config import EngineConfig
from tuili.engine.kv_cache import KVCacheManager
from tuili.engine.request import Logprob, Request, Status

if TYPE_CHECKING:
    from tuili.engine.spec_decode.speculator import Speculator
    from tuili.engine.spec_decode.verify import Verified

# Whether a sampled token completes one of the request's stop strings (given only requests that
# have some; check: min_tokens is reached): the output processor's detokenizer knows.
StopStrings = Callable[[Request, int, bool], str | None]


@dataclass
class Batch:
    """What one step computes: for each request, its next `num_new` tokens from position `starts`
    (decodes first), its block table, and (a hybrid model's) its recurrent-state slot."""
    requests: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    num_decodes: int = 0
    state_slots: list[int] = field(default_factory=list)  # empty: the model keeps no state
    state_ops: object | None = None  # its slots' snapshot copies (engine/state_cache.StateOps)

    def add(self, req: Request, n: int, block_table: list[int], state_slot: int | None = None
            ) -> None:
        self.requests.append(req)
        self.num_new.append(n)
        self.starts.append(req.num_computed_tokens)
        self.block_tables.append(block_table)
        if state_slot is not None:
            self.state_slots.append(state_slot)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int,
                 speculator: Speculator | None = None, pooling_blocks: bool = True):
        """pooling_blocks: whether pooling requests hold KV blocks (an encoder's need none: it
        keeps no cache, so they skip the pool and count only against the budget and seqs)."""
        self.kv = kv
        self.pooling_blocks = pooling_blocks
        self.speculator = speculator  # guesses decodes' next tokens (spec_decode/)
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

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a request (or abort it): out of the queues, its blocks freed."""
        req.finish(reason, stop_reason)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.remove(req)
        if self.speculator is not None:
            self.speculator.release(req)

    def schedule(self) -> Batch:
        """The next step's batch; its tokens count as computed from now on (the step that computes
        them is queued before the next schedule)."""
        batch, budget = Batch(), self.budget
        decodes = [r for r in self.running
                   if r.num_tokens - r.num_computed_tokens == 1 and not self._at_limit(r)]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        # Decodes with drafts verify them as short prefills after the plain decodes.
        guessing = []
        if self.speculator is not None:
            self.speculator.plan(decodes, budget)
            guessing = [r for r in decodes if r.draft]
            decodes = [r for r in decodes if not r.draft]
        preempted = False
        for group in (decodes, guessing, prefills):
            for req in group:
                if budget == 0:
                    break
                if req.status is not Status.RUNNING:  # preempted earlier in this loop
                    continue
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if req.draft and not self._fit_draft(req, budget):
                    n = 1
                elif req.draft:
                    n += len(req.draft)
                if not self._allocate_or_preempt(req, n, batch):
                    preempted = True
                    continue
                batch.add(req, n, self.kv.block_ids(req), self.kv.state_slot(req))
                budget -= n
            if group is decodes:
                batch.num_decodes = len(batch)
        if not preempted:
            self._admit_waiting(batch, budget)
        batch.state_ops = self.kv.take_state_ops()
        for req, n in zip(batch.requests, batch.num_new):
            req.num_computed_tokens += n
        scheduled = {r.request_id for r in batch.requests}
        for req in guessing:
            if req.request_id not in scheduled:
                req.draft = None
        return batch

    def _fit_draft(self, req: Request, budget: int) -> bool:
        """Shorten the request's draft to the budget and the free blocks (guesses never preempt
        anyone); False (and no draft) when none of it fits."""
        req.draft.truncate(budget - 1)
        if req.draft and self.kv.allocate(req, 1 + len(req.draft)):
            return True
        req.draft = None
        return False

    def update(self, batch: Batch, sampled: list[Request], tokens: list[int],
               logprobs: list[Logprob | None], stop_strings: StopStrings,
               verified: list[tuple[Request, Verified]] = ()) -> None:
        """Apply a step's tokens, read back: each sampled token takes its pending place; stop
        tokens, stop strings and length limits finish requests; the batch's other requests offer
        their newly filled blocks to the prefix cache. A verified request first rolls back the
        K/V of its rejected drafts, then gains its kept tokens one by one."""
        for req, token, lp in zip(sampled, tokens, logprobs):
            if not req.is_finished:  # not aborted meanwhile
                self._append_token(req, token, lp, stop_strings)
        for req, v in verified:
            req.draft = None
            if req.is_finished:
                continue
            # computed: the tokens before the last real one, it, and the kept drafts
            req.num_computed_tokens = len(req.token_ids) + v.kept
            self.kv.trim(req)
            for token, lp in zip(v.tokens, v.logprobs):
                self._append_token(req, token, lp, stop_strings, pending=False)
                if req.is_finished:
                    break
        for req in batch.requests:
            if not req.is_finished:
                self.kv.cache_computed_blocks(req)

    def _append_token(self, req: Request, token: int, logprob: Logprob | None,
                      stop_strings: StopStrings, pending: bool = True) -> None:
        req.token_ids.append(token)
        req.num_pending -= pending
        if logprob is not None:
            req.logprobs.append(logprob)
        p, n_out = req.params, req.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return self.finish(req, "stop")
            if token in p.stop_token_ids:
                return self.finish(req, "stop", token)
        if p.stop:
            stop = stop_strings(req, token, n_out >= p.min_tokens)
            if stop is not None:
                return self.finish(req, "stop", stop)
        if self._at_limit(req):
            self.finish(req, "length")

    def _at_limit(self, req: Request) -> bool:
        """Whether the request's last token (maybe still pending) is its final one: it waits to be
        finished, not to be computed."""
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
        req.draft = None
        self.kv.free(req)
        req.status = Status.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # just preempted; resumes once its token is read
                break
            pooling = req.pooling is not None
            if not pooling:  # a pooling request computes (and pools) every token
                self.kv.match_prefix(req)
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and self.chunked and not pooling:
                n = budget
            if n > budget or ((self.pooling_blocks or not pooling)
                              and not self.kv.allocate(req, n)):
                self.kv.free(req)  # give back the prefix hits; try again next step
                break
            self.waiting.popleft()
            if req.status is Status.WAITING:  # first admission, not a resume
                self.kv.count_admission(req)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.add(req, n, self.kv.block_ids(req), self.kv.state_slot(req))
            budget -= n
