"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuili.errors import InvalidParameter, RequestCancelled

log = logging.getLogger("tuili")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_parameter(e: InvalidParameter) -> APIError:
    return APIError(400, str(e), param=e.param, code=getattr(e, "code", "invalid_value"))


def error_event(e: Exception, request_id: str) -> dict:
    """The OpenAI error body for a failure after a stream started (its 200 is already sent)."""
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, InvalidParameter):
        return bad_parameter(e).body()
    if isinstance(e, RequestCancelled):
        return cancelled(e).body()
    log.error("request %s failed mid-stream", request_id, exc_info=e)
    return internal_error(e, request_id).body()


def cancelled(e: RequestCancelled) -> APIError:
    return APIError(503, str(e), type="server_error", code=getattr(e, "code", "shutting_down"),
                    headers={"Retry-After": "1"})


def internal_error(e: BaseException, request_id: str) -> APIError:
    return APIError(500, f"internal error ({type(e).__name__}); the server log has it under "
                         f"request id {request_id}", type="server_error", code="internal_error",
                    headers={REQUEST_ID_HEADER: request_id})


REQUEST_ID_HEADER = "x-request-id"
# The server's own send (the app's, below every middleware), kept in the scope for a streamed
# body's chunks (EventStream): the layers between (Starlette's error and exception handling,
# FaultMiddleware, routing) only watch for the response's start, and each costs a coroutine
# call per chunk (BENCHMARKS.md, issue 19). Set by the app (tuili.server.app).
BODY_SEND = "tuili.body_send"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def assign_request_id(scope: Scope) -> str:
    """The request's id (the client's X-Request-Id when sane, else a new one), kept in the
    scope's state."""
    given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode(
        "latin-1")
    rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    scope.setdefault("state", {})["request_id"] = rid
    return rid


class FaultMiddleware:
    """Gives every HTTP request an id (the client's X-Request-Id when sane, else a new one),
    sends it back as X-Request-Id, and turns an exception nothing else handled (a fault of ours)
    into a logged, OpenAI-shaped 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = assign_request_id(scope)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            log.error("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"),
                      exc_info=e)
            if not started:  # else the client sees the response end early
                await internal_error(e, rid).response()(scope, receive, send)


def install_handlers(app: FastAPI) -> None:
    app.add_middleware(FaultMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(InvalidParameter)
    async def _invalid(_: Request, e: InvalidParameter) -> JSONResponse:
        return bad_parameter(e).response()

    @app.exception_handler(RequestCancelled)
    async def _cancelled(_: Request, e: RequestCancelled) -> JSONResponse:
        return cancelled(e).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind, headers=e.headers).response()
