"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from tuili.errors import InvalidParameter

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
    return APIError(400, str(e), param=e.param, code="invalid_value")


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body validated as `model`; 400 naming the field when it is not."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        param = _param_name(err["loc"])
        code = "missing_parameter" if err["type"] == "missing" else "invalid_type"
        if code == "missing_parameter":
            raise APIError(400, f"{param}: is required", param=param, code=code) from e
        # a union field fails once per member: say all of them
        reasons = dict.fromkeys(x["msg"] for x in errors if _param_name(x["loc"]) == param)
        message = f"{param}: got {err['input']!r}; " + " or ".join(reasons)
        raise APIError(400, message, param=param, code=code) from e


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            break  # pydantic's name for the union member it tried: the field is enough
        else:
            name += ("." if name else "") + part
    return name


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(InvalidParameter)
    async def _invalid(_: Request, e: InvalidParameter) -> JSONResponse:
        return bad_parameter(e).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}",
                        type="server_error").response()
