"""What both completion endpoints share: admission, sampling params, streams, SSE, disconnects."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from tuili.async_llm import AsyncLLM, RequestCancelled, RequestStream
from tuili.errors import InvalidParameter
from tuili.outputs import RequestOutput
from tuili.sampling_params import SamplingParams
from tuili.server.body import parse_body
from tuili.server.errors import BODY_SEND, APIError, error_event
from tuili.server.limits import ServerLimits
from tuili.server.metrics import Metrics
from tuili.server.protocol import SamplingFields

M = TypeVar("M", bound=BaseModel)

RETRY_AFTER_S = 1


@dataclass
class ServerState:
    llm: AsyncLLM
    model_name: str
    api_key: str | None = None
    max_waiting: int | None = None  # sequences without a first token
    max_waiting_tokens: int | None = None  # their prompt tokens
    limits: ServerLimits = field(default_factory=ServerLimits)
    tool_call_parser: str = "auto"  # or one of tool_parsers.PARSERS
    metrics: Metrics = field(init=False)
    draining: bool = False

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.llm.stats)

    async def parse(self, request: Request, model: type[M]) -> M:
        return await parse_body(request, model, max_bytes=self.limits.max_body_bytes,
                                max_depth=self.limits.max_json_depth,
                                run_in_worker=self.llm.run_in_worker)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def admit(self, sequences: int, tokens: int) -> None:
        """Refuse a request that the waiting queue could never hold (400), or cannot hold now or
        while draining (503 + Retry-After). Counted: sequences (n per prompt), prompt tokens."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error",
                           code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
        for what, asked, waiting, limit, flag, param in (
                ("sequences", sequences, self.llm.unstarted_sequences, self.max_waiting,
                 "--max-waiting", "n"),
                ("prompt tokens", tokens, self.llm.unstarted_tokens, self.max_waiting_tokens,
                 "--max-waiting-tokens", "prompt")):
            if limit is None:
                continue
            if asked > limit:
                raise InvalidParameter(param, f"the request brings {asked} {what}, more than the "
                                              f"waiting queue ever holds ({flag} {limit}); split "
                                              "it into smaller requests")
            if waiting + asked > limit:
                raise APIError(503, f"the waiting queue is full ({waiting} {what} waiting, "
                                    f"{flag} {limit}); retry later", type="server_error",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def sampling_params(self, body: SamplingFields, max_tokens: int | None,
                        field: str = "max_tokens", **extra) -> SamplingParams:
        if getattr(body, "logit_bias", None):
            raise InvalidParameter("logit_bias", "is not supported; leave it out")
        self.limits.check_n("n", body.n)
        self.limits.check_stop(body.stop, body.stop_token_ids)
        params = self.llm.default_sampling_params(**body.sampling_kwargs(),
                                                  max_tokens=max_tokens, **extra)
        self.llm.check_params(params)
        self.check_length(1, params, field, at_least=True)  # every prompt has a token
        return params

    def check_length(self, n: int, params: SamplingParams, field: str, at_least: bool = False,
                     prompt_param: str = "prompt") -> None:
        """400 when a prompt of `n` tokens (or at least `n`) and what the request asks to
        generate cannot fit in the context, with all the numbers."""
        limit = self.llm.max_model_len
        has = f"at least {n}" if at_least else str(n)
        if n >= limit:
            how = " (judged from its bytes, before tokenizing)" if at_least else ""
            raise InvalidParameter(prompt_param, f"the prompt has {has} tokens{how}, more than "
                                                 f"max_model_len={limit}; shorten it or raise "
                                                 "--max-model-len")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise InvalidParameter(field, f"the prompt has {has} tokens and {field} is "
                                   f"{params.max_tokens}: {n + params.max_tokens} is more than "
                                   f"max_model_len={limit}; shorten the prompt or lower {field}")
        if params.min_tokens > limit - n:
            raise InvalidParameter("min_tokens", f"got {params.min_tokens}, but max_model_len="
                                   f"{limit} leaves room for at most {limit - n} after the "
                                   f"prompt's {has} token(s)")

    def encode_prompts(self, prompts: list[str | list[int]], params: SamplingParams, field: str,
                       prompt_param: str = "prompt", add_special_tokens: bool = True
                       ) -> list[list[int]]:
        """Token ids of each prompt, each checked against the context. It tokenizes: call it
        through llm.run_in_worker. A text whose bytes prove it too long is refused untokenized."""
        for p in prompts:  # every bound first, so nothing is tokenized for a doomed call
            if isinstance(p, str):
                self.check_length(self.llm.min_prompt_tokens(p), params, field, True, prompt_param)
        out = []
        for p in prompts:
            ids = self.llm.tokenize(p, add_special_tokens=add_special_tokens)
            self.check_length(len(ids), params, field, False, prompt_param)
            out.append(ids)
        return out

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float) -> RequestStream:
        return self.llm.generate(request_id, prompt_ids, params,
                                 observe=self.metrics.timer(arrival))

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests; in `timeout` seconds end those still running (thread-safe: it
        is called from a signal handler)."""
        if self.draining:
            return
        self.draining = True
        error = RequestCancelled(f"the server is shutting down and its drain timeout "
                                 f"(--drain-timeout {timeout:g}s) ended this request")
        timer = threading.Timer(timeout, self.llm.cancel_all, args=(error,))
        timer.daemon = True
        timer.start()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict) -> str:
    return f"data: {dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"

quote = json.encoder.encode_basestring  # json.dumps(s, ensure_ascii=False) of one str


def dumps(data) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def sse_parts(data: dict) -> tuple[str, str]:
    """(head, tail) such that head + ",".join(each choice's dumps()) + tail is sse(data) with
    those choices: a stream's fixed parts, encoded once (data["choices"] must be [], and a bare
    `"choices":[]` can only be that key: quotes inside JSON strings are escaped)."""
    head, key, tail = sse(data).partition('"choices":[]')
    return head + key[:-1], key[-1] + tail


def sse_error(e: Exception, request_id: str) -> str:
    """An error after the stream started: the 200 is already sent, so it goes in the stream."""
    return sse(error_event(e, request_id))


class ChunkWriter(Protocol):
    """A streamed response's SSE text: what goes first, what each output adds, what ends it."""

    def first(self) -> str: ...

    def chunk(self, i: int, out: RequestOutput) -> str: ...  # "" when the output adds nothing

    def last(self) -> str: ...  # before [DONE]


class EventStream(StreamingResponse):
    """A text/event-stream response of engine outputs, `writer` turning each prompt's outputs
    (its RequestStream's, i = the prompt's index) into chunks. A step's delivery hands each
    stream's outputs to `_ready`, which makes the chunk and sends it there and then, the ASGI
    send run by hand: no task wakes per stream and step, and no async generator stands between
    the engine's outputs and the socket (each cost the front CPU per streamed token,
    BENCHMARKS.md issue 19). A send that cannot finish at once (a paused transport), the end
    and errors go back to the response's coroutine. Starlette's StreamingResponse around it
    stops the stream when the client goes away; any end closes (aborts) the streams. An error
    once the 200 is sent goes in the stream, then [DONE]."""

    def __init__(self, streams: list[RequestStream], writer: ChunkWriter, request_id: str):
        super().__init__((), media_type="text/event-stream")
        self.streams, self.writer, self.request_id = streams, writer, request_id
        self.body_send: Send | None = None
        self._left = len(streams)  # streams not yet done
        self._wake: asyncio.Future | None = None  # set while `_ready` may send
        self._send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.body_send = scope.get(BODY_SEND)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        # the start went through every layer; the chunks need not
        self._send = send = self.body_send or send
        try:
            text = await self._chunks()
        finally:
            self._wake = None
            for s in self.streams:
                s.inbox.listener = None
                s.close()
        await send({"type": "http.response.body", "body": (text + SSE_DONE).encode(),
                    "more_body": False})

    async def _chunks(self) -> str:
        """Sends the chunks; returns the text that ends the stream (before [DONE])."""
        try:
            text = self.writer.first()
        except Exception as e:
            return sse_error(e, self.request_id)
        if text:
            await self._send(_body(text))
        streams, loop = self.streams, asyncio.get_running_loop()
        for i, s in enumerate(streams):
            s.inbox.listener = functools.partial(self._ready, i)
        while True:
            i = next((i for i, s in enumerate(streams) if s.inbox.items and not s.done), None)
            if i is not None:  # what came while no `_ready` could send
                text, end = self._take(i)
                if end:
                    return text
                if text:
                    await self._send(_body(text))
                continue
            self._wake = wake = loop.create_future()
            try:
                kind, value = await wake
            finally:
                self._wake = None
            if kind == "end":
                return value
            if kind == "raise":
                raise value
            await _Resumed(*value)  # a send that did not finish at once

    def _ready(self, i: int) -> None:
        """Stream i got outputs (called on the loop, inside a step's delivery)."""
        wake = self._wake
        if wake is None or wake.done():  # the coroutine is busy: it takes them
            return
        text, end = self._take(i)
        if end:
            wake.set_result(("end", text))
        elif text:
            send = self._send(_body(text))
            try:
                waiting = send.send(None)
            except StopIteration:
                return
            except Exception as e:  # the client is gone
                wake.set_result(("raise", e))
                return
            wake.set_result(("send", (send, waiting)))

    def _take(self, i: int) -> tuple[str, bool]:
        """Stream i's next chunk, and whether it ends the response (with last() then)."""
        stream = self.streams[i]
        try:
            text = self.writer.chunk(i, stream.take())
        except Exception as e:  # the writer's and the engine's errors
            return sse_error(e, self.request_id), True
        if stream.done:
            self._left -= 1
            if not self._left:
                return text + self._last(), True
        return text, False

    def _last(self) -> str:
        try:
            return self.writer.last()
        except Exception as e:
            return sse_error(e, self.request_id)


def _body(text: str) -> dict:
    return {"type": "http.response.body", "body": text.encode(), "more_body": True}


class _Resumed:
    """Awaits a coroutine that was started by hand and stopped at `waiting` (what it awaits):
    the rest of its run, as a task would have run it."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro, waiting):
        self.coro, self.waiting = coro, waiting

    def __await__(self):
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as e:  # cancelled (the client went away) while it waited
                try:
                    waiting = coro.throw(e)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests' streams as they come; one is passed through.
    Leaving early closes (aborts) whatever has not finished."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        async for item in _interleave(streams):
            yield item
    finally:
        for s in streams:
            s.close()


async def _interleave(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                inbox.put_nowait((i, out))
        except Exception as e:
            inbox.put_nowait((i, e))
        inbox.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    final: dict[int, RequestOutput] = {}
    async for i, out in merge_streams(streams):
        if out.finished:
            final[i] = out
    return [final[i] for i in range(len(streams))]


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`; if the client goes away first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "the client closed the request", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
