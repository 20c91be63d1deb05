"""Router: picks a version and a worker for each request and relays the worker's answer as it
arrives. A request that fails before its first byte (the worker unreachable, gone before its
answer's first body bytes, or a 5xx) is tried once more on another worker; once bytes have
reached the client nothing is retried."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from tuili.router.balance import PrefixIndex, VersionPicker, choose_worker
from tuili.router.config import ModelRoute, RouterConfig, Version
from tuili.router.metrics import RouterMetrics
from tuili.router.workers import WorkerPool
from tuili.server.errors import BODY_SEND, APIError

log = logging.getLogger("tuili")

VERSION_HEADER = "x-tuili-version"  # a client's choice of version; also on every answer
USER_HEADER = "x-tuili-user"  # pins a client to one version, as the body's `user` does
WORKER_HEADER = "x-tuili-worker"
_PASSED_BACK = ("content-type", "retry-after", "cache-control")


# No limit on a whole answer (a stream runs as long as it generates); 5 s to connect.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
_CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class Router:
    def __init__(self, config: RouterConfig):
        self.config = config
        # aiohttp's client, made at start (it belongs to the serving event loop): its C parser
        # costs the router about half the CPU a request that httpx's did (BENCHMARKS.md, issue 24)
        self.client: aiohttp.ClientSession | None = None
        self.pool = WorkerPool(config.workers, config.health_interval, config.worker_api_key)
        self.index = PrefixIndex(config.prefix_chars, config.max_prefix_chunks)
        self.pool.on_down = self.index.forget
        self.pickers = {name: VersionPicker(r.versions) for name, r in config.models.items()}
        self.metrics = RouterMetrics()
        self._turn = 0

    async def start(self) -> None:
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60),
            timeout=_TIMEOUT, auto_decompress=False, skip_auto_headers=("User-Agent",))
        await self.pool.start(self.client)

    async def stop(self) -> None:
        await self.pool.stop()
        if self.client is not None:
            await self.client.close()

    # ---- what is served where ---------------------------------------------------------------

    def routes(self) -> dict[str, ModelRoute]:
        """The configured models, and each model a discovered worker serves (one version)."""
        routes = dict(self.config.models)
        found: dict[str, list[str]] = {}
        for url in self.config.discover:
            for model in self.pool.workers[url].models:
                found.setdefault(model, []).append(url)
        for model, urls in found.items():
            routes.setdefault(model, ModelRoute(model, (Version("default", 1.0, tuple(urls)),)))
        return routes

    def choose(self, model: str, pin: str | None, forced: str | None, hashes: list[bytes],
               exclude: set[str]) -> tuple[Version, str] | None:
        """(version, worker URL) for a request, or None when no worker can take it."""
        route = self.routes().get(model)
        if route is None:
            raise APIError(404, f"the model {model!r} does not exist here; the router serves "
                                f"{sorted(self.routes())}", type="invalid_request_error",
                           param="model", code="model_not_found")
        serving = {v.name: [u for u in v.workers
                            if u not in exclude and self.pool.workers[u].serving]
                   for v in route.versions}
        if forced is not None:
            if forced not in serving:
                raise APIError(400, f"model {model!r} has no version {forced!r} (header "
                                    f"{VERSION_HEADER}); it has {list(serving)}",
                               param=VERSION_HEADER, code="invalid_value")
            available = {forced} if serving[forced] else set()
        else:
            available = {name for name, urls in serving.items() if urls}
        picker = self.pickers.get(model) or VersionPicker(route.versions)
        version = picker.pick(available, pin)
        if version is None:
            return None
        candidates = serving[version.name]
        load = {u: self.pool.workers[u].load for u in candidates}
        self._turn += 1
        url = choose_worker(candidates, load, self.index, hashes, self._turn)
        self.index.record(url, hashes)
        return version, url

    # ---- relaying ---------------------------------------------------------------------------

    async def forward(self, path: str, body: dict, raw: bytes, headers, request_id: str) -> Response:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "model: is required (a string naming the model)", param="model",
                           code="missing_parameter")
        user = headers.get(USER_HEADER) or body.get("user")
        pin = user if isinstance(user, str) and user else None
        hashes = self.index.hashes(prompt_text(body))
        tried: set[str] = set()
        failure: Response | None = None
        why = "no worker serves it now"
        for attempt in range(2):
            chosen = self.choose(model, pin, headers.get(VERSION_HEADER), hashes, tried)
            if chosen is None:
                break
            version, url = chosen
            tried.add(url)
            worker = self.pool.workers[url]
            name = model if model in worker.models else worker.models[0]
            content = raw if name == model else json.dumps({**body, "model": name}).encode()
            started = time.perf_counter()
            worker.in_flight += 1
            resp = None
            try:
                resp = await self.client.post(url + path, data=content,
                                              headers=self._upstream_headers(headers, request_id))
                # The body's first bytes are awaited here, not in the relay: until they come (a
                # stream's headers alone say nothing yet) the request may still move elsewhere.
                first = await resp.content.readany()
            except _CLIENT_ERRORS as e:
                worker.in_flight -= 1
                if resp is not None:
                    resp.close()
                why = f"{url}: {type(e).__name__}: {e}"
                self.pool.mark_down(url, why)
                self.metrics.error(model, url, "connect" if resp is None else "before_first_byte")
                continue
            if resp.status >= 500 and attempt == 0:
                try:
                    content = first + await resp.content.read()
                except _CLIENT_ERRORS:
                    content = first
                resp.close()
                worker.in_flight -= 1
                self.metrics.error(model, url, f"status_{resp.status}")
                why = f"{url} answered {resp.status}"
                failure = Response(content, resp.status,
                                   headers=self._answer_headers(resp, version, url))
                continue
            if attempt:
                self.metrics.retries.labels(model).inc()
            self.metrics.first_byte.labels(model, url).observe(time.perf_counter() - started)
            return self._relay(resp, first, model, version, url, started)
        if failure is not None:  # nowhere else to try: the worker's own answer
            return failure
        raise APIError(503 if not tried else 502,
                       f"no worker could take the request for model {model!r} ({why})",
                       type="server_error", code="no_worker_available",
                       headers={"Retry-After": "1"})

    def _relay(self, resp: aiohttp.ClientResponse, first: bytes, model: str, version: Version,
               url: str, started: float) -> StreamingResponse:
        worker = self.pool.workers[url]
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        metrics = self.metrics

        async def relay(send: Send) -> None:
            """The worker's bytes to the client as they come, each read passed on at once."""
            try:
                if first:
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                while chunk := await resp.content.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except _CLIENT_ERRORS as e:  # the worker went away mid-answer: no retry now
                log.warning("router: %s failed mid-answer (%s: %s)", url, type(e).__name__, e)
                self.pool.mark_down(url, f"failed mid-answer: {e}")
                metrics.error(model, url, "mid_stream")
                if sse:
                    err = {"error": {"message": f"the worker serving this stream failed "
                                                f"({type(e).__name__})", "type": "server_error",
                                     "param": None, "code": "worker_failed"}}
                    await send({"type": "http.response.body", "more_body": True,
                                "body": f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()})

        async def done() -> None:
            worker.in_flight -= 1
            if resp.content.at_eof():
                resp.release()  # the connection back to the pool
            else:
                resp.close()  # the client left first: closing tells the worker to stop
            metrics.finished(model, version.name, url, resp.status,
                             time.perf_counter() - started)

        return Relay(relay, status_code=resp.status,
                     headers=self._answer_headers(resp, version, url),
                     background=BackgroundTask(done))

    def _upstream_headers(self, headers, request_id: str) -> dict[str, str]:
        out = {"content-type": "application/json", "x-request-id": request_id,
               "accept": headers.get("accept", "*/*")}
        if self.config.worker_api_key:
            out["authorization"] = f"Bearer {self.config.worker_api_key}"
        return out

    @staticmethod
    def _answer_headers(resp: aiohttp.ClientResponse, version: Version,
                        url: str) -> dict[str, str]:
        out = {k: resp.headers[k] for k in _PASSED_BACK if k in resp.headers}
        out[VERSION_HEADER] = version.name
        out[WORKER_HEADER] = url
        return out


class Relay(StreamingResponse):
    """A worker's answer relayed: the start goes through every middleware, the body's chunks
    straight to the send below them (BODY_SEND, as the server's EventStream does: each layer
    between would cost a coroutine call per chunk)."""

    def __init__(self, relay, **kwargs):
        super().__init__((), **kwargs)
        self.relay, self.body_send = relay, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.body_send = scope.get(BODY_SEND)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        body_send = self.body_send or send
        await self.relay(body_send)
        await body_send({"type": "http.response.body", "body": b"", "more_body": False})


def prompt_text(body: dict) -> str:
    """The text a request's prompt starts with, for prefix affinity ('' when it has none)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content
                                  if isinstance(p, dict) and isinstance(p.get("text"), str))
            parts.append(f"{m.get('role')}\x1f{content if isinstance(content, str) else ''}\x1e")
        return "".join(parts)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return ",".join(map(str, prompt)) + ","
    return ""
