"""The router's HTTP surface: the OpenAI routes relayed to workers, /v1/models over every
worker, /health, /metrics, API keys checked here."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

import tuili
from tuili.router.proxy import Router
from tuili.server.auth import bearer_check, key_error
from tuili.server.body import INLINE_BYTES, parse_json, read_body
from tuili.server.errors import (BODY_SEND, REQUEST_ID_HEADER, APIError, assign_request_id,
                                 install_handlers, internal_error)

log = logging.getLogger("tuili")

RELAYED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/rerank",
           "/v2/rerank", "/v1/score", "/tokenize", "/detokenize")


def build_app(router: Router, api_keys: list[str], max_body_bytes: int = 4 * 2**20,
              max_json_depth: int = 64) -> RelayFront:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="tuili router", version=tuili.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    router.metrics.watch(router.pool)
    public, api = APIRouter(), APIRouter()
    created = int(time.time())

    @public.get("/health")
    async def health() -> Response:
        serving = any(w.serving for w in router.pool.workers.values())
        return Response(status_code=200 if serving else 503)

    @public.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tuili",
             "versions": [v.name for v in route.versions]}
            for name, route in sorted(router.routes().items())]}

    app.include_router(public)
    app.include_router(api, dependencies=[Depends(bearer_check(api_keys))])
    return RelayFront(app, router, api_keys, max_body_bytes, max_json_depth)


class RelayFront:
    """The relayed routes in plain ASGI, ahead of FastAPI (which serves the rest): per request,
    FastAPI's middleware, routing and dependency layers cost the router more CPU than the relay
    itself (BENCHMARKS.md, issue 24). The same checks, errors and request ids as the app's."""

    def __init__(self, app: FastAPI, router: Router, api_keys: list[str], max_body_bytes: int,
                 max_json_depth: int):
        self.app, self.router = app, router
        self.keys = [k.encode() for k in api_keys if k]
        self.max_body_bytes, self.max_json_depth = max_body_bytes, max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in RELAYED or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        rid = assign_request_id(scope)
        scope[BODY_SEND] = send  # the relay's chunks go straight here
        request = Request(scope, receive)
        try:
            response = await self._answer(request, rid)
        except APIError as e:
            response = e.response()
        except Exception as e:  # a fault of ours: logged, an OpenAI-shaped 500
            log.error("request %s (POST %s) failed", rid, scope["path"], exc_info=e)
            response = internal_error(e, rid).response()
        response.headers[REQUEST_ID_HEADER] = rid
        await response(scope, receive, send)

    async def _answer(self, request: Request, rid: str) -> Response:
        headers = request.headers
        if (error := key_error(headers.get("authorization", ""), self.keys)) is not None:
            raise error
        raw = await read_body(request, self.max_body_bytes)
        if len(raw) <= INLINE_BYTES:
            body = parse_json(raw, self.max_json_depth)
        else:  # a large prompt: parsed off the event loop
            body = await asyncio.to_thread(parse_json, raw, self.max_json_depth)
        return await self.router.forward(request.url.path, body, raw, headers, rid)
