"""AsyncLLM: the engine loop fed and drained by asyncio code (the server).

The loop (engine_core.EngineLoop) runs in a thread of this process or, with `engine_process`
(the default on GPU), in a process of its own, so that the HTTP side's Python never holds the
engine's GIL. It takes commands (add, abort) and hands each step's outputs to the event loop
through a Mailbox: one call_soon_threadsafe for whatever steps came since the loop last took
them. It never waits on the network; the HTTP side never waits on a step.
Work on the input that grows with its size (tokenizing, templates) runs in a small thread pool,
`run_in_worker`, so a long prompt never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tuili.config import EngineConfig
from tuili.engine.request_checks import ParamsCheck, encode_prompt
from tuili.engine_core import Abort, Add, CancelAll, EngineStats, ThreadCore
from tuili.errors import (EngineDied, InvalidParameter, PromptTooLong, RequestCancelled,
                          check_text)
from tuili.outputs import RequestOutput
from tuili.pooling_params import PoolingParams
from tuili.prompt_bound import PromptBound
from tuili.sampling_params import SamplingParams

log = logging.getLogger("tuili")

_GEN_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

Observer = Callable[[RequestOutput, float], None]
T = TypeVar("T")
__all__ = ["AsyncLLM", "EngineStats", "RequestCancelled", "RequestStream"]


class AsyncLLM:
    """AsyncLLM("smollm2-135m"); in a coroutine, `async for out in llm.generate(...)`."""

    def __init__(self, model: str | None = None, **options):
        if model is not None:
            options["model"] = model
        config = EngineConfig(**options).validate()
        self.stats = EngineStats()
        # What was taken in and has no output yet (event-loop side): the admission counts.
        self.unstarted_sequences = 0  # n per request
        self.unstarted_tokens = 0  # prompt tokens, once per prompt (its n samples share them)
        # Each request's stream, by request id: registered when made, dropped at its end.
        self._sinks: dict[str, Inbox] = {}
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}  # what goes to each loop
        self.engine_process = _engine_process(config)
        if self.engine_process:
            from tuili.engine_process import ProcessCore

            self._core = ProcessCore(config, self)
        else:
            self._core = ThreadCore(config, self)
        facts = self.facts = self._core.facts
        self.tokenizer = facts.tokenizer
        self.generation_config = facts.generation_config
        self.max_model_len = facts.max_model_len
        self.vocab_size = facts.vocab_size
        self.task = facts.task  # generate, embed or score
        self.max_pooling_len = facts.max_pooling_len
        self.cross_encoder = facts.cross_encoder
        self.kv_cache_tokens = facts.kv_cache_tokens
        # the engine's own check when it runs here; the same check of our own beside a process
        self._checks = (self._core.engine.checks if not self.engine_process else
                        ParamsCheck(self.tokenizer, self.vocab_size, facts.eos_token_ids))
        self.prompt_bound = PromptBound.of(self.tokenizer.backend)
        # half the cores at most: the event loop and the engine need the rest
        self._workers = ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) // 2)),
                                           "tuili-tokenize")

    # ---- the event-loop side ---------------------------------------------------------------

    def default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams(**given), the model's generation_config filling the sampling knobs
        (temperature, top_p, ...) that `given` leaves out or sets to None."""
        gen = self.generation_config
        values = {k: gen[k] for k in _GEN_DEFAULTS if gen.get(k) is not None}
        values.update((k, v) for k, v in given.items() if v is not None or k not in _GEN_DEFAULTS)
        return SamplingParams(**values)

    async def run_in_worker(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) in the tokenizer threads, off the event loop (tokenizers release
        the GIL while they work)."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._workers, call)

    def min_prompt_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, from its bytes alone (0 when none is known)."""
        return self.prompt_bound.min_tokens(text) if self.prompt_bound else 0

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, checked (valid text, known ids, not empty) but not against the
        context. It tokenizes text: from a coroutine, call it through run_in_worker."""
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            if not add_special_tokens:  # a chat template's text: it has its own
                prompt = self.tokenizer.encode(prompt, add_special_tokens=False)
        ids = encode_prompt(self.tokenizer, self.vocab_size, prompt)
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty; give at least one token")
        return ids

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """tokenize(prompt), also refused when longer than the context, as add_request would."""
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), self.max_model_len)
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """The engine's own check, here so that the caller hears of a bad value before queueing."""
        self._checks(params)

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 observe: Observer | None = None) -> RequestStream:
        """Queue the request now; iterate the returned stream for its outputs."""
        return RequestStream(self, request_id, prompt_ids, params, observe)

    def encode(self, request_id: str, prompt_ids: list[int], params: PoolingParams
               ) -> RequestStream:
        """Queue a pooling request (embed, score); its one output ends the stream."""
        return RequestStream(self, request_id, prompt_ids, params, None)

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self._core.send(Abort(request_id))

    def cancel_all(self, error: Exception) -> None:
        """End every request in flight: each stream raises `error` (thread-safe)."""
        self._core.send(CancelAll(error))

    @property
    def alive(self) -> bool:
        """Whether the engine loop still runs (the server's /health)."""
        return self._core.alive

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop, aborting whatever still runs."""
        self._core.shutdown(timeout)
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _queue(self, request_id: str, prompt_ids: list[int],
               params: SamplingParams | PoolingParams, sink: Inbox) -> None:
        if not self._core.alive:
            raise EngineDied("the engine is not running (its process exited or a rank failed); "
                             "the server must be restarted")
        self._sinks[request_id] = sink
        self._core.send(Add(request_id, prompt_ids, params))

    # ---- what the engine loop reports (from its thread, or the pipe's reader) --------------

    def on_outputs(self, outputs: list, t: float) -> None:
        sinks, by_loop = self._sinks, {}
        for out in outputs:
            inbox = sinks.pop(out.request_id, None) if out.finished else \
                sinks.get(out.request_id)
            if inbox is not None:
                items = by_loop.get(inbox.loop)
                if items is None:
                    items = by_loop[inbox.loop] = []
                items.append((inbox, (out, t)))
        for loop, items in by_loop.items():
            self._mailbox(loop).post(items)

    def on_failed(self, request_id: str, error: BaseException) -> None:
        inbox = self._sinks.pop(request_id, None)
        if inbox is not None:
            self._mailbox(inbox.loop).post([(inbox, error)])

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop)
        return box

    def on_stats(self, stats: EngineStats) -> None:
        self.stats = stats

    def on_ended(self, error: BaseException) -> None:
        for rid in list(self._sinks):
            self.on_failed(rid, error)


def _engine_process(config: EngineConfig) -> bool:
    """The engine in a process of its own unless told: on GPU (BENCHMARKS.md, issue 19)."""
    if config.engine_process is not None:
        return config.engine_process
    if config.device.startswith("cuda"):
        return True
    if config.device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


class Mailbox:
    """What the engine's side (its thread, or the pipe's reader) hands to one event loop: lists
    of (inbox, item), taken on the loop in one callback however many came since the last. So a
    loop that fell behind by several steps takes them at once, and each stream's listener or
    consumer is told once: their outputs go out merged, as one chunk. The order is kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: collections.deque = collections.deque()
        self.scheduled = False  # a take is on the loop's queue

    def post(self, items: list) -> None:
        """From any thread."""
        self.pending.append(items)
        if not self.scheduled:  # take() clears it before it looks, so none is missed
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.take)

    def take(self) -> None:
        self.scheduled = False
        told: dict[Inbox, None] = {}  # in the order of their first item
        pending = self.pending
        while pending:
            for inbox, item in pending.popleft():
                inbox.items.append(item)
                told[inbox] = None
        for inbox in told:
            inbox.tell()


class Inbox:
    """What was delivered to one stream and not yet taken ((output, time) or an error), and the
    future its consumer waits on when there is none: lighter than an asyncio.Queue, and however
    many outputs pile up, a step wakes the consumer once. A consumer may instead set `listener`,
    called at each delivery (inside the step's one callback on the loop, so it must not raise):
    then no task is woken per stream and step. Used on its loop only."""

    __slots__ = ("loop", "items", "waiter", "listener")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.listener: Callable[[], None] | None = None

    def put(self, item) -> None:
        self.items.append(item)
        self.tell()

    def tell(self) -> None:
        """That items came."""
        if self.listener is not None:
            self.listener()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is delivered."""
        self.waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None


class RequestStream:
    """One request's outputs as an async iterator. Outputs that piled up while the consumer was
    busy come merged into one (deltas joined). Closing it (or dropping it) before the end aborts
    the request, as does cancelling a task that waits on it."""

    def __init__(self, llm: AsyncLLM, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, observe: Observer | None):
        self.llm, self.request_id, self.observe = llm, request_id, observe
        self.started = self.done = True  # until queued: nothing to count, nothing to abort
        self.inbox = Inbox(asyncio.get_running_loop())
        # counted at once, so admission limits hold under bursts
        self.counts = (params.n, len(prompt_ids))
        llm._queue(request_id, prompt_ids, params, self.inbox)
        self.started = self.done = False
        llm.unstarted_sequences += params.n
        llm.unstarted_tokens += len(prompt_ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        if not self.inbox.items:
            try:
                await self.inbox.wait()
            except BaseException:
                self.close()
                raise
        return self.take()

    def take(self) -> RequestOutput:
        """What was delivered and not yet taken, as one output (raising a delivered error); call
        it only when something was (inbox.items), and not once the stream is done."""
        inbox = self.inbox
        items, inbox.items = inbox.items, []
        observe = self.observe
        for item in items:
            if isinstance(item, BaseException):
                self.close()
                raise item
            if observe is not None:
                observe(*item)
        if not self.started:
            self._mark_started()
        out = items[0][0] if len(items) == 1 else _merge([out for out, _ in items])
        if out.finished:
            self.done = True
        return out

    def _mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.llm.unstarted_sequences -= self.counts[0]
            self.llm.unstarted_tokens -= self.counts[1]

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.llm.abort(self.request_id)
        self._mark_started()

    def __del__(self) -> None:
        self.close()


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """The last output, with the deltas of all of them."""
    last = outs[-1]
    for i, sample in enumerate(last.outputs):
        sample.delta_text = "".join(o.outputs[i].delta_text for o in outs)
        sample.delta_token_ids = [t for o in outs for t in o.outputs[i].delta_token_ids]
    return last
