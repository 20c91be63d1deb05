"""The engine loop in a process of its own, so that the HTTP side (JSON, SSE framing, the event
loop) and the engine's Python never wait for one GIL.

The two sides talk over one pipe. Commands go down as they come; each step comes up as one
message: its outputs, each carrying only what is new (token ids, logprobs, text),
from which this side rebuilds the RequestOutputs the thread-run engine would have handed over,
and the engine's state after it. An engine process that dies fails every request in flight.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

from tuili.config import EngineConfig
from tuili.engine_core import STOP, Abort, EngineFacts, EngineLoop, EngineStats, Events
from tuili.engine.request import Logprob
from tuili.errors import EngineDied
from tuili.outputs import CompletionOutput, RequestOutput

log = logging.getLogger("tuili")


class ProcessCore:
    """Starts the engine process and relays: commands down the pipe, events up from it."""

    def __init__(self, config: EngineConfig, events: Events):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked into
        self._conn, child = ctx.Pipe()
        level = log.getEffectiveLevel()
        self._proc = ctx.Process(target=_engine_main, args=(config, child, level),
                                 name="tuili-engine", daemon=True)
        self._proc.start()
        child.close()
        try:
            kind, value = _recv(self._conn)
        except EOFError:
            self._proc.join(5)
            raise EngineDied(f"the engine process exited while loading the model (exit code "
                             f"{self._proc.exitcode})") from None
        if kind == "error":
            self._proc.join(5)
            raise value
        self.facts: EngineFacts = value
        log.info("the engine runs in engine process %d", self._proc.pid)
        self._events = events
        self._outputs = _Rebuilder()
        self._send_lock = threading.Lock()  # the event loop and timers send
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="tuili-engine-reader",
                                        daemon=True)
        self._reader.start()

    def send(self, cmd) -> None:
        if isinstance(cmd, Abort):
            self._outputs.drop(cmd.request_id)
        data = pickle.dumps(cmd, pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            try:
                self._conn.send_bytes(data)
            except OSError:  # the process is gone: the reader fails what was in flight
                pass

    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and self._reader.is_alive()

    def shutdown(self, timeout: float) -> None:
        self._stopping = True
        self.send(STOP)
        self._reader.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()

    def _read(self) -> None:
        events = self._events
        while True:
            try:
                msg = _recv(self._conn)
            except (EOFError, OSError):
                break
            if msg[0] == "step":
                t = time.monotonic()
                outs = [o for o in map(self._outputs.rebuild, msg[1]) if o is not None]
                if outs:
                    events.on_outputs(outs, t)
                events.on_stats(msg[2])
            else:  # ("failed", request id, error)
                self._outputs.drop(msg[1])
                events.on_failed(msg[1], msg[2])
        self._proc.join(5)
        if not self._stopping:
            log.error("the engine process exited (exit code %s)", self._proc.exitcode)
            events.on_ended(EngineDied(f"the engine process exited (exit code "
                                    f"{self._proc.exitcode}); the server must be restarted"))


# ---- the engine process ---------------------------------------------------------------------

def _engine_main(config: EngineConfig, conn, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C and stops this
    logging.basicConfig(level=log_level, format="%(levelname)s:     %(message)s")
    from tuili.engine.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as e:
        _send(conn, ("error", _picklable(e)))
        return
    _send(conn, ("ready", EngineFacts.of(engine)))

    def take(block: bool) -> list:
        try:
            if block and not conn.poll(1.0):
                return []
            cmds = []
            while conn.poll():
                cmds.append(pickle.loads(conn.recv_bytes()))
            return cmds
        except (EOFError, OSError):  # the server is gone
            return [STOP]

    events = _PipeEvents(conn)
    EngineLoop(engine, events).run(take)
    events.close()


class _PipeEvents:
    """The loop's events, up the pipe: a step's outputs and the state after it in one message.
    A thread of their own encodes and sends them, while the loop goes on to the next step (its
    GPU wait leaves the GIL free)."""

    def __init__(self, conn):
        self.conn, self.pending = conn, []
        self.wire = _Wire()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_all, name="tuili-engine-sender",
                                        daemon=True)
        self._thread.start()

    def on_outputs(self, outputs: list, t: float) -> None:
        self._queue.put(("outputs", outputs))

    def on_failed(self, request_id: str, error: BaseException) -> None:
        self._queue.put(("failed", request_id, error))

    def on_stats(self, stats: EngineStats) -> None:
        self._queue.put(("stats", stats))

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _send_all(self) -> None:
        while (event := self._queue.get()) is not None:
            if event[0] == "outputs":
                self.pending.extend(self.wire.encode(o) for o in event[1])
            elif event[0] == "stats":
                msg, self.pending = ("step", self.pending, event[1]), []
                _send(self.conn, msg)
            else:
                self.wire.drop(event[1])
                _send(self.conn, ("failed", event[1], _picklable(event[2])))


def _send(conn, msg) -> None:
    try:
        conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server is gone; the loop stops at its next read


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _picklable(error: BaseException) -> BaseException:
    """The error itself if it crosses the pipe, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---- what crosses the pipe ------------------------------------------------------------------

@dataclass
class _Sent:
    """A generation request's part of the wire: how much text and how many logprobs of each
    sample have gone, and the cached-token count last sent."""
    text: list[int]
    logprobs: list[int]
    num_cached: int = 0


class _Wire:
    """RequestOutputs as what is new in each (the engine side). Most outputs are one running
    sample's next token and text, with nothing else changed: those go as (request id, text,
    token ids) alone, the rest as the whole record (it is the front's CPU per streamed token
    that unpickling and rebuilding cost)."""

    def __init__(self):
        self.sent: dict[str, _Sent] = {}

    def encode(self, out):
        if not isinstance(out, RequestOutput):  # a pooling output: one message, whole
            return out
        sent = self.sent.get(out.request_id)
        if sent is not None and len(out.outputs) == 1 and not out.finished \
                and out.prompt_logprobs is None and out.num_cached_tokens == sent.num_cached:
            o = out.outputs[0]
            if o.logprobs is None and o.finish_reason is None and self._grown(o, sent, 0):
                sent.text[0] = len(o.text)
                return out.request_id, o.delta_text, o.delta_token_ids
        first = sent is None
        n = len(out.outputs)
        if first:
            sent = self.sent[out.request_id] = _Sent([0] * n, [0] * n)
        sent.num_cached = out.num_cached_tokens
        samples = []
        for i, o in enumerate(out.outputs):
            new_logprobs = None
            if o.logprobs is not None:
                new_logprobs, sent.logprobs[i] = o.logprobs[sent.logprobs[i]:], len(o.logprobs)
            grown = self._grown(o, sent, i)
            sent.text[i] = len(o.text)
            samples.append((None if grown else o.text, o.delta_text, o.delta_token_ids,
                            o.finish_reason, o.stop_reason, new_logprobs))
        if out.finished:
            del self.sent[out.request_id]
        head = (out.prompt, out.prompt_token_ids) if first else None
        return (out.request_id, head, samples, out.finished, out.prompt_logprobs,
                out.num_cached_tokens)

    @staticmethod
    def _grown(o: CompletionOutput, sent: _Sent, i: int) -> bool:
        """Whether the text is what went before plus the delta (not so when a stop string cut
        it): then the text need not go."""
        return len(o.text) == sent.text[i] + len(o.delta_text) and o.text.endswith(o.delta_text)

    def drop(self, request_id: str) -> None:
        self.sent.pop(request_id, None)


class Prefix(Sequence):
    """The first len(items) items of a list that later only grows at its end: what an output's
    token ids (or logprobs) were when it was made, without copying them (a copy per output
    grows with the output's length). Read-only; compares equal to the list it shows."""

    __slots__ = ("items", "n")

    def __init__(self, items: list):
        self.items, self.n = items, len(items)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.items[slice(*i.indices(self.n))] if i.step is None or i.step > 0 \
                else self.items[:self.n][i]
        return self.items[range(self.n)[i]]

    def __iter__(self):
        return islice(self.items, self.n)

    def __eq__(self, other) -> bool:
        if isinstance(other, (Prefix, list)):
            return len(other) == self.n and self.items[:self.n] == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self.items[:self.n])


@dataclass
class _Stream:
    prompt: str | None
    prompt_token_ids: list[int]
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[Logprob]] = field(default_factory=list)
    num_cached: int = 0


class _Rebuilder:
    """RequestOutputs rebuilt from what was new in each (this side)."""

    def __init__(self):
        self.streams: dict[str, _Stream] = {}

    def rebuild(self, msg):
        if not isinstance(msg, tuple):
            return msg
        if len(msg) == 3:  # one running sample's next text and token ids, nothing else new
            rid, delta, new_ids = msg
            stream = self.streams.get(rid)
            if stream is None:  # aborted here while its output was on the way
                return None
            text = stream.texts[0] = stream.texts[0] + delta
            ids = stream.token_ids[0]
            ids.extend(new_ids)
            return RequestOutput(rid, stream.prompt, stream.prompt_token_ids, [CompletionOutput(
                0, text, Prefix(ids), None, None, None, delta, new_ids)], False, None,
                stream.num_cached)
        rid, head, samples, finished, prompt_logprobs, num_cached = msg
        stream = self.streams.get(rid)
        if stream is None:
            if head is None:  # aborted here while its output was on the way
                return None
            stream = self.streams[rid] = _Stream(*head)
        stream.num_cached = num_cached
        outputs = []
        for i, (text, delta, new_ids, reason, stop, new_logprobs) in enumerate(samples):
            if i == len(stream.token_ids):
                stream.texts.append("")
                stream.token_ids.append([])
                stream.logprobs.append([])
            text = stream.texts[i] = stream.texts[i] + delta if text is None else text
            ids = stream.token_ids[i]
            ids.extend(new_ids)
            logprobs = None
            if new_logprobs is not None:
                stream.logprobs[i].extend(new_logprobs)
                logprobs = Prefix(stream.logprobs[i])
            outputs.append(CompletionOutput(i, text, Prefix(ids), reason, stop, logprobs, delta,
                                            new_ids))
        if finished:
            del self.streams[rid]
        return RequestOutput(rid, stream.prompt, stream.prompt_token_ids, outputs, finished,
                             prompt_logprobs, num_cached)

    def drop(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
