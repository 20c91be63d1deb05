"""Per-request grammar matchers: each step's token bitmask, and the tokens they accept.

The engine fills a step's bitmask on the host after queueing the model's forward pass, so the
work overlaps the device's; the sampler applies it on the device. A request's matcher has seen
every token read back so far: the engine samples a step only after the previous step's tokens
are resolved, so no rollback is needed (until speculative decoding brings one).

A grammar not compiled yet compiles in a background thread (a big schema over a 128k vocabulary
takes tens to hundreds of ms): its request waits outside the scheduler, the others step on, and
`ready()` hands it back once its matcher exists."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch
import xgrammar as xgr

from tuili.engine.request import Request
from tuili.models.tokenizer import Tokenizer
from tuili.structured.grammar import GrammarCompiler
from tuili.structured.mask import StepMask
from tuili.structured.params import StructuredOutputs


class GrammarMatchers:
    """The matchers of the requests that have a constraint, by request id."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.compiler = GrammarCompiler(tokenizer, vocab_size, self.stop_token_ids)
        self.matchers: dict[str, xgr.GrammarMatcher] = {}
        self.compiling: dict[str, tuple[Request, Future]] = {}  # by request id
        self._executor: ThreadPoolExecutor | None = None
        self._host = xgr.allocate_token_bitmask(1, vocab_size)
        words = self._host.shape[1]
        self._stop_words = torch.zeros(words, dtype=torch.int32)  # the stop ids' bits
        for t in self.stop_token_ids:
            self._stop_words[t // 32] |= _bit(t % 32)

    def compile(self, so: StructuredOutputs) -> xgr.CompiledGrammar:
        return self.compiler.compile(so)

    def add(self, req: Request) -> bool:
        """Give req its matcher; True if it can be scheduled now (its grammar was compiled),
        False if the grammar compiles in the background (see ready)."""
        so = req.params.structured_outputs
        compiled = self.compiler.cached(so)
        if compiled is not None:
            self.matchers[req.request_id] = xgr.GrammarMatcher(compiled)
            return True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="tuili-grammar")
        self.compiling[req.request_id] = (req, self._executor.submit(self.compile, so))
        return False

    def ready(self) -> list[tuple[Request, BaseException | None]]:
        """The requests whose grammar finished compiling since the last call, each with the
        error that stopped it (None: its matcher is made, it can be scheduled)."""
        done = [rid for rid, (_, future) in self.compiling.items() if future.done()]
        out = []
        for rid in done:
            req, future = self.compiling.pop(rid)
            error = future.exception()
            if error is None:
                self.matchers[rid] = xgr.GrammarMatcher(future.result())
            out.append((req, error))
        return out

    def wait(self, timeout: float) -> None:
        """Block until a background compile ends, at most `timeout` seconds."""
        wait([future for _, future in self.compiling.values()], timeout, FIRST_COMPLETED)

    def remove(self, req: Request) -> None:
        self.matchers.pop(req.request_id, None)
        self.compiling.pop(req.request_id, None)  # a compile under way still fills the cache

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def step_mask(self, reqs: list[Request], device: torch.device) -> StepMask | None:
        """The bitmask of a step's sampled rows, or None when none of them has a grammar."""
        rows = [(i, self.matchers[r.request_id]) for i, r in enumerate(reqs)
                if r.request_id in self.matchers]
        if not rows:
            return None
        if self._host.shape[0] < len(reqs):
            self._host = xgr.allocate_token_bitmask(len(reqs), self.vocab_size)
        host = self._host[:len(reqs)]
        host.fill_(-1)  # all bits set: every token allowed
        only_stop = set()
        for i, m in rows:
            m.fill_next_token_bitmask(host, i)
            if not bool((host[i] & ~self._stop_words).any()):
                only_stop.add(i)
        bitmask = host.to(device, non_blocking=True) if device.type == "cuda" else host.clone()
        return StepMask(bitmask, only_stop)

    def accept(self, reqs: list[Request], tokens: list[int]) -> list[Request]:
        """Advance the matchers by the step's tokens (read back); the requests whose grammar has
        ended (or refused the token) and that are still running, for the engine to finish.
        Finished requests' matchers are dropped."""
        ended = []
        for req, token in zip(reqs, tokens):
            m = self.matchers.get(req.request_id)
            if m is None:
                continue
            if req.is_finished:
                del self.matchers[req.request_id]
                continue
            if not m.accept_token(token) or m.is_terminated():
                del self.matchers[req.request_id]
                ended.append(req)
        return ended


def _bit(i: int) -> int:
    """Bit i of an int32 word as a Python int in the signed range."""
    return 1 << i if i < 31 else -(1 << 31)
