"""Request bodies in: bounded in size, parsed as JSON, checked (depth, valid Unicode) and
validated against a pydantic model, each failure a 4xx naming what is wrong."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from tuili.errors import InvalidParameter, check_text
from tuili.sampling_params import shown
from tuili.server.errors import APIError, bad_parameter

M = TypeVar("M", bound=BaseModel)
INLINE_BYTES = 64 * 1024  # smaller bodies are parsed on the event loop: a thread hop costs more


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 once it passes `limit` bytes (before reading it all when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], *, max_bytes: int, max_depth: int,
                     run_in_worker: Callable[..., Awaitable]) -> M:
    """The request's JSON body validated as `model`; a large one is parsed in a worker thread."""
    raw = await read_body(request, max_bytes)
    if len(raw) <= INLINE_BYTES:
        return decode_body(raw, model, max_depth)
    return await run_in_worker(decode_body, raw, model, max_depth)


def decode_body(raw: bytes, model: type[M], max_depth: int) -> M:
    data = parse_json(raw, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


def parse_json(raw: bytes, max_depth: int) -> dict:
    """A JSON object from raw bytes, checked for depth and valid Unicode; 400s otherwise."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the C parser recurses once per level
        raise _too_deep(max_depth) from None
    except ValueError as e:  # bad syntax or encoding, NaN/Infinity, an int of > 4300 digits
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    check_tree(data, max_depth)
    return data


def check_tree(data: dict, max_depth: int) -> None:
    """400 for nesting deeper than `max_depth` or a string that is not valid Unicode (a lone
    surrogate, which JSON's \\ud800 escape allows), naming where it is."""
    stack: list[tuple[dict | list, tuple, int]] = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth, path)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str):
                _check_str(key, path)
            if isinstance(value, str):
                _check_str(value, path + (key,))
            elif isinstance(value, (dict, list)):
                stack.append((value, path + (key,), depth + 1))


def _check_str(s: str, path: tuple) -> None:
    try:
        check_text(_json_path(path) or "body", s)
    except InvalidParameter as e:
        raise bad_parameter(e) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"the body has {'more than ' if at_least else ''}{size} bytes, more than "
                         f"the {limit} allowed (--max-body-bytes)", code="request_too_large")


def _too_deep(limit: int, path: tuple = ()) -> APIError:
    where = _json_path(path[:4]) + ("..." if len(path) > 4 else "")
    return APIError(400, f"the body nests arrays/objects more than {limit} deep"
                         f"{f' at {where}' if where else ''} (--max-json-depth)",
                    param=_json_path(path[:1]) or None, code="invalid_json")


def _invalid(e: ValidationError) -> APIError:
    errors = e.errors()
    err = errors[0]
    param = _path_name(err["loc"]) or "body"
    if err["type"] == "missing":
        return APIError(400, f"{param}: is required", param=param, code="missing_parameter")
    # a union field fails once per member: say all of them
    reasons = dict.fromkeys(x["msg"] for x in errors if _path_name(x["loc"]) == param)
    message = f"{param}: got {shown(err['input'])}; " + " or ".join(reasons)
    return APIError(400, message, param=param, code="invalid_type")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _path_name(loc: tuple) -> str:
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


def _json_path(path: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
