"""The engine loop that AsyncLLM drives, and the facts its front reads: the loop runs in a thread
of the caller's process (`ThreadCore`) or in a process of its own (`engine_process.ProcessCore`).

Either way the loop takes commands (add, abort, cancel all, stop), runs step() while there is
work, and reports to an `Events` object: each step's outputs, requests that failed, and a
snapshot of the engine's state. It never waits on the network.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from tuili.config import EngineConfig
from tuili.errors import EngineDied, RankFailure
from tuili.models.tokenizer import Tokenizer
from tuili.outputs import RequestOutput
from tuili.pooling_params import PoolingParams
from tuili.sampling_params import SamplingParams

log = logging.getLogger("tuili")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, published by the engine loop after every step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    spec: dict[str, float] = field(default_factory=dict)  # speculative decoding's, when on
    profile: dict[str, float] = field(default_factory=dict)  # the phase profiler's, with --profile


@dataclass(frozen=True)
class EngineFacts:
    """What the front needs of the engine it drives, read once when the engine is built."""
    model: str
    tokenizer: Tokenizer
    generation_config: dict
    vocab_size: int
    embedding_size: int  # a pooling model's embeddings' width
    eos_token_ids: frozenset[int]
    max_model_len: int
    max_pooling_len: int
    task: str  # generate, embed or score
    cross_encoder: bool  # scores a text pair in one forward
    kv_cache_tokens: int

    @classmethod
    def of(cls, engine) -> EngineFacts:
        return cls(
            model=engine.config.model, tokenizer=engine.tokenizer,
            generation_config=dict(engine.generation_config),
            vocab_size=engine.model_config.vocab_size, embedding_size=engine.embedding_size,
            eos_token_ids=engine.eos_token_ids, max_model_len=engine.max_model_len,
            max_pooling_len=engine.max_pooling_len, task=engine.task,
            cross_encoder=hasattr(engine.runner.model, "classify"),
            kv_cache_tokens=engine.pool.num_blocks * engine.pool.block_size)


# Commands, as the loop receives them.
@dataclass
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | PoolingParams


@dataclass
class Abort:
    request_id: str


@dataclass
class CancelAll:
    error: Exception


STOP = "stop"


class Events(Protocol):
    """Where the loop reports."""

    def on_outputs(self, outputs: list, t: float) -> None: ...

    def on_failed(self, request_id: str, error: BaseException) -> None: ...

    def on_stats(self, stats: EngineStats) -> None: ...

    def on_ended(self, error: BaseException) -> None:
        """The loop is gone for good (its process died): fail whatever is in flight."""


class EngineLoop:
    """The loop around LLMEngine.step(): commands in, outputs and failures out. One per engine."""

    def __init__(self, engine, events: Events):
        self.engine, self.events = engine, events
        self.live: set[str] = set()  # requests added and not yet finished or failed

    def run(self, take) -> None:
        """Loop until `take(block)` (the pending commands, waiting for one if `block`; a
        timeout gives []) returns STOP among them."""
        engine = self.engine
        while True:
            if not self._apply(take(not engine.has_unfinished_requests())):
                break
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:  # a broken step fails the requests in flight, not the server
                    log.exception("engine step failed")
                    if isinstance(e, RankFailure):  # the engine cannot run on: /health 503,
                        self._fail_all(EngineDied(str(e)))  # and requests an OpenAI 503
                        break
                    self._fail_all(e)
                    outputs = []
                for out in outputs:
                    if out.finished:
                        self.live.discard(out.request_id)
                for rid, error in engine.take_failures():
                    self.live.discard(rid)
                    self.events.on_failed(rid, error)
                if outputs:
                    self.events.on_outputs(outputs, time.monotonic())
            self.events.on_stats(self.stats())
        self._fail_all(RuntimeError("the server is shutting down"))
        self.events.on_stats(self.stats())
        engine.shutdown()

    def _apply(self, commands: list) -> bool:
        for cmd in commands:
            if cmd == STOP:
                return False
            if isinstance(cmd, Add):
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
                except Exception as e:
                    self.events.on_failed(cmd.request_id, e)
                    continue
                self.live.add(cmd.request_id)
            elif isinstance(cmd, CancelAll):
                self._fail_all(cmd.error)
            elif cmd.request_id in self.live:
                self.live.discard(cmd.request_id)
                self.engine.abort_request(cmd.request_id)
        return True

    def _fail_all(self, error: Exception) -> None:
        for rid in sorted(self.live):
            self.engine.abort_request(rid)
            self.events.on_failed(rid, error)
        self.live.clear()

    def stats(self) -> EngineStats:
        e = self.engine
        return EngineStats(
            num_running=len(e.scheduler.running), num_waiting=len(e.scheduler.waiting),
            kv_cache_usage=e.pool.usage, prefix_cache_queries=e.prefix_cache_stats.queries,
            prefix_cache_hits=e.prefix_cache_stats.hits, num_preemptions=e.num_preemptions,
            spec=e.spec_stats.summary() if e.spec_stats is not None else {},
            profile=e.profiler.snapshot() if e.profiler is not None else {})


def drain(inbox: queue.SimpleQueue, block: bool, timeout: float = 1.0) -> list:
    """The commands waiting in an inbox (waiting up to `timeout` for one if `block`)."""
    try:
        cmds = [inbox.get(timeout=timeout) if block else inbox.get_nowait()]
    except queue.Empty:
        return []
    while True:
        try:
            cmds.append(inbox.get_nowait())
        except queue.Empty:
            return cmds


class ThreadCore:
    """The engine loop in a thread of this process (the engine is built in that thread too)."""

    def __init__(self, config: EngineConfig, events: Events):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config, events),
                                        name="tuili-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self.facts = EngineFacts.of(self.engine)

    def _run(self, config: EngineConfig, events: Events) -> None:
        # Built in the thread that runs it: built in another thread, the same CPU steps measured
        # ~1.4x slower (256 sequences, 2 cores).
        from tuili.engine.engine import LLMEngine

        try:
            self.engine = LLMEngine(config)
        except BaseException as e:
            self._error = e
            return
        finally:
            self._ready.set()
        EngineLoop(self.engine, events).run(lambda block: drain(self._inbox, block))
        events.on_ended(EngineDied("the engine stopped"))  # streams that came in meanwhile

    def send(self, cmd) -> None:
        self._inbox.put(cmd)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float) -> None:
        self._inbox.put(STOP)
        self._thread.join(timeout)
