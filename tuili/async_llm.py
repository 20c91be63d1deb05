"""AsyncLLM: the engine loop in its own thread, fed and drained by asyncio code (the server).

The engine thread owns the LLMEngine: it takes commands (add, abort) from a thread-safe inbox,
runs step() while there is work, and hands each step's outputs to the event loop in one
call_soon_threadsafe. It never waits on the network; the HTTP side never waits on a step.
Work on the input that grows with its size (tokenizing, templates) runs in a small thread pool,
`run_in_worker`, so a long prompt never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from tuili.config import EngineConfig
from tuili.distributed.group import RankFailure
from tuili.engine.engine import LLMEngine
from tuili.errors import InvalidParameter, PromptTooLong, RequestCancelled, check_text
from tuili.outputs import RequestOutput
from tuili.pooling_params import PoolingParams
from tuili.prompt_bound import PromptBound
from tuili.sampling_params import SamplingParams

log = logging.getLogger("tuili")

_GEN_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, published by the engine thread after every step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    profile: dict[str, float] = field(default_factory=dict)  # the phase profiler's, with --profile


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


@dataclass
class _CancelAll:
    error: Exception


_STOP = object()
Observer = Callable[[RequestOutput, float], None]
T = TypeVar("T")


class AsyncLLM:
    """AsyncLLM("smollm2-135m"); in a coroutine, `async for out in llm.generate(...)`."""

    def __init__(self, model: str | None = None, **options):
        if model is not None:
            options["model"] = model
        config = EngineConfig(**options)
        self.stats = EngineStats()
        # What was taken in and has no output yet (event-loop side): the admission counts.
        self.unstarted_sequences = 0  # n per request
        self.unstarted_tokens = 0  # prompt tokens, once per prompt (its n samples share them)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.failure: Exception | None = None  # what stopped the engine for good (a dead rank)
        self._thread = threading.Thread(target=self._run, args=(config,), name="tuili-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.model_config.vocab_size
        self.task = self.engine.task  # generate, embed or score
        self.max_pooling_len = self.engine.max_pooling_len
        self.cross_encoder = hasattr(self.engine.runner.model, "classify")
        self.kv_cache_tokens = self.engine.pool.num_blocks * self.engine.pool.block_size
        self.prompt_bound = PromptBound.of(self.tokenizer.backend)
        # half the cores at most: the event loop and the engine need the rest
        self._workers = ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) // 2)),
                                           "tuili-tokenize")

    # ---- the event-loop side ---------------------------------------------------------------

    def default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams(**given), the model's generation_config filling the sampling knobs
        (temperature, top_p, ...) that `given` leaves out or sets to None."""
        gen = self.engine.generation_config
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
        ids = self.engine.encode_prompt(prompt)
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
        self.engine.check_params(params)

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 observe: Observer | None = None) -> RequestStream:
        """Queue the request now; iterate the returned stream for its outputs."""
        return RequestStream(self, request_id, prompt_ids, params, observe)

    def encode(self, request_id: str, prompt_ids: list[int], params: PoolingParams
               ) -> RequestStream:
        """Queue a pooling request (embed, score); its one output ends the stream."""
        return RequestStream(self, request_id, prompt_ids, params, None)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def cancel_all(self, error: Exception) -> None:
        """End every request in flight: each stream raises `error` (thread-safe)."""
        self._inbox.put(_CancelAll(error))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, aborting whatever still runs."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._workers.shutdown(wait=False, cancel_futures=True)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self, config: EngineConfig) -> None:
        # The engine is built in the thread that runs it: built in another thread, the same
        # CPU steps measured ~1.4x slower (256 sequences, 2 cores).
        try:
            self.engine = engine = LLMEngine(config)
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._ready.set()
        while True:
            if not self._take_commands(block=not engine.has_unfinished_requests()):
                break
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:  # a broken step fails the requests in flight, not the server
                    log.exception("engine step failed")
                    if isinstance(e, RankFailure):  # a tensor-parallel rank is gone: /health 503
                        self.failure = e
                    self._fail_all(e)
                    outputs = []
                self._dispatch(outputs, time.monotonic())
            self._publish_stats()
        self._fail_all(RuntimeError("the server is shutting down"))
        self._publish_stats()
        engine.shutdown()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once told to stop."""
        try:
            cmd = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _CancelAll):
                self._fail_all(cmd.error)
            else:
                self._abort(cmd.request_id)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
        except Exception as e:
            cmd.loop.call_soon_threadsafe(cmd.sink.put_nowait, e)
            return
        self._sinks[cmd.request_id] = (cmd.loop, cmd.sink)

    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)

    def _fail_all(self, error: Exception) -> None:
        for rid, (loop, sink) in list(self._sinks.items()):
            self.engine.abort_request(rid)
            loop.call_soon_threadsafe(sink.put_nowait, error)
        self._sinks.clear()

    def _dispatch(self, outputs: list[RequestOutput], t: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            by_loop.setdefault(target[0], []).append((target[1], (out, t)))
        for loop, items in by_loop.items():  # one wake-up per loop per step
            loop.call_soon_threadsafe(_deliver, items)

    def _publish_stats(self) -> None:
        e = self.engine
        self.stats = EngineStats(
            num_running=len(e.scheduler.running), num_waiting=len(e.scheduler.waiting),
            kv_cache_usage=e.pool.usage, prefix_cache_queries=e.prefix_cache_stats.queries,
            prefix_cache_hits=e.prefix_cache_stats.hits, num_preemptions=e.num_preemptions,
            profile=e.profiler.snapshot() if e.profiler is not None else {})


class RequestStream:
    """One request's outputs as an async iterator. Outputs that piled up while the consumer was
    busy come merged into one (deltas joined). Closing it (or dropping it) before the end aborts
    the request, as does cancelling a task that waits on it."""

    def __init__(self, llm: AsyncLLM, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, observe: Observer | None):
        self.llm, self.request_id, self.observe = llm, request_id, observe
        self.sink: asyncio.Queue = asyncio.Queue()
        self.started = self.done = False
        # counted at once, so admission limits hold under bursts
        self.counts = (params.n, len(prompt_ids))
        llm.unstarted_sequences += params.n
        llm.unstarted_tokens += len(prompt_ids)
        llm._inbox.put(_Add(request_id, prompt_ids, params, asyncio.get_running_loop(), self.sink))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            items = [await self.sink.get()]
        except BaseException:
            self.close()
            raise
        while not self.sink.empty():
            items.append(self.sink.get_nowait())
        outs = []
        for item in items:
            if isinstance(item, BaseException):
                self.close()
                raise item
            out, t = item
            if self.observe is not None:
                self.observe(out, t)
            outs.append(out)
        self._mark_started()
        out = _merge(outs)
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


def _deliver(items: list) -> None:
    for sink, item in items:
        sink.put_nowait(item)


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """The last output, with the deltas of all of them."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    for i, sample in enumerate(last.outputs):
        sample.delta_text = "".join(o.outputs[i].delta_text for o in outs)
        sample.delta_token_ids = [t for o in outs for t in o.outputs[i].delta_token_ids]
    return last
