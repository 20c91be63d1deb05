"""API keys: a check (and a FastAPI dependency) that wants 'Authorization: Bearer KEY' with one of the keys."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request

from tuili.server.errors import APIError


def key_error(header: str, expected: Sequence[bytes]) -> APIError | None:
    """The 401 for an Authorization header that bears none of the `expected` keys (None when it
    does, or when there are none)."""
    if not expected:
        return None
    scheme, _, given = header.partition(" ")
    token = given.strip().encode()
    # compare_digest takes the same time wherever the first difference is; every key is tried
    matches = [hmac.compare_digest(token, key) for key in expected]
    if scheme.lower() != "bearer" or not any(matches):
        what = "a wrong API key" if header else "no API key (send 'Authorization: Bearer KEY')"
        return APIError(401, f"the request has {what}", type="invalid_request_error",
                        code="invalid_api_key")
    return None


def bearer_check(keys: Sequence[str]):
    """A dependency that passes a request bearing one of `keys` (every request when there are
    none) and answers 401 otherwise."""
    expected = [k.encode() for k in keys if k]

    async def check(request: Request) -> None:
        if (error := key_error(request.headers.get("authorization", ""), expected)) is not None:
            raise error
    return check
