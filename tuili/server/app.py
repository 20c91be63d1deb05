"""The FastAPI app: routes, API-key check, and the small endpoints (models, tokenizer, health)."""

from __future__ import annotations

import gc
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import tuili
from tuili.errors import InvalidParameter, check_text
from tuili.sampling_params import shown
from tuili.server.auth import bearer_check
from tuili.server.chat import create_chat_completion, render_text
from tuili.server.completions import create_completion
from tuili.server.errors import BODY_SEND, APIError, install_handlers
from tuili.server.pooling import pooling_routes, require_task
from tuili.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest)
from tuili.server.serving import ServerState

# Young-generation collections once per this many new container objects, not 700: streaming
# makes a few short-lived ones per token, and each pass walks every young object still alive
# (the streams' state), so at 700 the passes cost the front microseconds per token (BENCHMARKS.md,
# issue 19). Older generations keep Python's ratios.
_GC_YOUNG = 50_000


class _App(FastAPI):
    """FastAPI, keeping the server's own send in the scope (BODY_SEND)."""

    async def __call__(self, scope, receive, send) -> None:
        scope[BODY_SEND] = send
        await super().__call__(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # What start-up built (modules, the tokenizer, the app) lives as long as the server:
        # frozen, the collector's full passes stop walking it (each took ~150 ms of the event
        # loop, once every ~12k streamed tokens: BENCHMARKS.md, issue 19)
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(_GC_YOUNG, *thresholds[1:])
        yield
        gc.set_threshold(*thresholds)
        state.llm.shutdown()

    app = _App(title="tuili", version=tuili.__version__, lifespan=lifespan, docs_url=None,
               redoc_url=None, openapi_url=None)
    app.state.tuili = state
    install_handlers(app)
    app.include_router(_public_routes(state))
    keys = [state.api_key] if state.api_key else []
    app.include_router(_api_routes(state), dependencies=[Depends(bearer_check(keys))])
    app.include_router(pooling_routes(state), dependencies=[Depends(bearer_check(keys))])
    return app


def _public_routes(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("tuili.server").joinpath("chat.html").read_text())

    @r.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if state.draining or not state.llm.alive else 200)

    @r.get("/version")
    async def version() -> dict:
        return {"version": tuili.__version__}

    @r.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r


def _api_routes(state: ServerState) -> APIRouter:
    r = APIRouter()
    created = int(time.time())
    tok = state.llm.tokenizer

    @r.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": created, "owned_by": "tuili",
            "root": state.llm.facts.model, "parent": None,
            "max_model_len": state.llm.max_model_len}]}

    @r.post("/v1/completions")
    async def completions(request: Request):
        require_task(state, "generate")
        return await create_completion(state, await state.parse(request, CompletionRequest),
                                       request)

    @r.post("/v1/chat/completions")
    async def chat(request: Request):
        require_task(state, "generate")
        body = await state.parse(request, ChatCompletionRequest)
        return await create_chat_completion(state, body, request)

    @r.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await state.parse(request, TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidParameter("prompt", "give exactly one of prompt and messages")
        return await state.llm.run_in_worker(_tokenize, body)

    def _tokenize(body: TokenizeRequest) -> dict:
        if body.prompt is not None:
            check_text("prompt", body.prompt)
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            text = render_text(tok, body.messages, tools=body.tools, template_kwargs=None,
                               add_generation_prompt=body.add_generation_prompt)
            ids = tok.encode(text, add_special_tokens=False)
        strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.llm.max_model_len, "tokens": ids,
                "token_strs": strs}

    @r.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await state.parse(request, DetokenizeRequest)
        state.check_model(body.model)
        return await state.llm.run_in_worker(_detokenize, body.tokens)

    def _detokenize(tokens: list[int]) -> dict:
        vocab = state.llm.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidParameter("tokens", f"token ids {shown(bad[:5])} are outside "
                                             f"[0, {vocab})")
        # the batch call releases the GIL while it works (decode holds it)
        return {"prompt": tok.backend.decode_batch([tokens], skip_special_tokens=True)[0]}

    @r.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse({
            "tokenizer_class": "tokenizers.Tokenizer", "vocab_size": tok.vocab_size,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "chat_template": tok.chat_template, "model_max_length": state.llm.max_model_len})

    return r
