"""API keys: a FastAPI dependency that wants 'Authorization: Bearer KEY' with one of the keys."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request

from tuili.server.errors import APIError


def bearer_check(keys: Sequence[str]):
    """A dependency that passes a request bearing one of `keys` (every request when there are
    none) and answers 401 otherwise."""
    expected = [k.encode() for k in keys if k]

    async def check(request: Request) -> None:
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        token = given.strip().encode()
        # compare_digest takes the same time wherever the first difference is; every key is tried
        matches = [hmac.compare_digest(token, key) for key in expected]
        if scheme.lower() != "bearer" or not any(matches):
            what = "a wrong API key" if header else "no API key (send 'Authorization: Bearer KEY')"
            raise APIError(401, f"the request has {what}", type="invalid_request_error",
                           code="invalid_api_key")
    return check
