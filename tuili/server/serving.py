"""What both completion endpoints share: admission, sampling params, streams, SSE, disconnects."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import Request

from tuili.async_llm import AsyncLLM, RequestStream
from tuili.errors import InvalidParameter
from tuili.outputs import RequestOutput
from tuili.sampling_params import SamplingParams
from tuili.server.errors import APIError
from tuili.server.metrics import Metrics
from tuili.server.protocol import SamplingFields

RETRY_AFTER_S = 1


@dataclass
class ServerState:
    llm: AsyncLLM
    model_name: str
    api_key: str | None = None
    max_waiting: int | None = None
    metrics: Metrics = field(init=False)
    draining: bool = False

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.llm.stats)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def admit(self, count: int) -> None:
        """Refuse new requests (503 + Retry-After) while the waiting queue is full or draining."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error",
                           code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
        waiting = self.llm.num_unstarted
        if self.max_waiting is not None and waiting + count > self.max_waiting:
            raise APIError(503, f"the waiting queue is full ({waiting} requests waiting, "
                                f"--max-waiting {self.max_waiting}); retry later",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def sampling_params(self, body: SamplingFields, max_tokens: int | None,
                        **extra) -> SamplingParams:
        if getattr(body, "logit_bias", None):
            raise InvalidParameter("logit_bias", "is not supported; leave it out")
        return self.llm.default_sampling_params(**body.sampling_kwargs(), max_tokens=max_tokens,
                                                **extra)

    def check_length(self, prompt_ids: list[int], params: SamplingParams, field: str) -> None:
        """400 when prompt + max_tokens cannot fit in the context, with all the numbers."""
        n, limit = len(prompt_ids), self.llm.max_model_len
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise InvalidParameter(field, f"the prompt has {n} tokens and {field} is "
                                   f"{params.max_tokens}: {n + params.max_tokens} is more than "
                                   f"max_model_len={limit}; shorten the prompt or lower {field}")

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float) -> RequestStream:
        return self.llm.generate(request_id, prompt_ids, params,
                                 observe=self.metrics.timer(arrival))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: Exception) -> str:
    """An error after the stream started: the 200 is already sent, so it goes in the stream."""
    status = 400 if isinstance(e, InvalidParameter) else 500
    return sse({"error": {"message": str(e), "type": "invalid_request_error" if status == 400
                          else "server_error", "param": getattr(e, "param", None), "code": None}})


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
