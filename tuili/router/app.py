"""The router's HTTP surface: the OpenAI routes relayed to workers, /v1/models over every
worker, /health, /metrics, API keys checked here."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

import tuili
from tuili.router.proxy import Router
from tuili.server.auth import bearer_check
from tuili.server.body import INLINE_BYTES, parse_json, read_body
from tuili.server.errors import install_handlers, request_id

RELAYED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/rerank",
           "/v2/rerank", "/v1/score", "/tokenize", "/detokenize")


def build_app(router: Router, api_keys: list[str], max_body_bytes: int = 4 * 2**20,
              max_json_depth: int = 64) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.pool.start()
        yield
        await router.pool.stop()
        await router.client.aclose()

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

    async def relay(request: Request) -> Response:
        raw = await read_body(request, max_body_bytes)
        if len(raw) <= INLINE_BYTES:
            body = parse_json(raw, max_json_depth)
        else:  # a large prompt: parsed off the event loop
            body = await asyncio.to_thread(parse_json, raw, max_json_depth)
        return await router.forward(request.url.path, body, raw, request.headers,
                                    request_id(request))

    for path in RELAYED:
        api.add_api_route(path, relay, methods=["POST"])
    app.include_router(public)
    app.include_router(api, dependencies=[Depends(bearer_check(api_keys))])
    return app
