"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

The official SDKs pick their exception class from the status code and decide whether to retry
from ``x-should-retry`` and ``retry-after``; every error tenantware sends sets them on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from tenantware.context import Outcome, RequestContext
from tenantware.types import Send

__all__ = ["GatewayError", "default_outcome", "error_body", "send_error"]


class _ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")


class GatewayError(Exception):
    """An error to answer with; raised inside the proxy, turned into a response at its edge."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        outcome: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.outcome = outcome
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.headers = list(headers)

    async def send(self, send: Send, ctx: RequestContext | None = None) -> None:
        await send_error(
            send,
            self.status,
            self.message,
            type=self.type,
            code=self.code,
            param=self.param,
            ctx=ctx,
            outcome=self.outcome,
            retry_after=self.retry_after,
            should_retry=self.should_retry,
            headers=self.headers,
        )


def default_outcome(status: int) -> str:
    """The outcome of an error that names none: a 4xx refuses the request, anything else is
    an error (so a validation 400 is recorded like the tenant layer's own refusals)."""
    return Outcome.REJECTED_REQUEST if 400 <= status < 500 else Outcome.ERROR


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    """The JSON body of an OpenAI-format error."""
    return _encode(_ErrorEnvelope(_ErrorDetail(message=message, type=type, param=param, code=code)))


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    ctx: RequestContext | None = None,
    outcome: str | None = None,
    retry_after: float | None = None,
    should_retry: bool | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete OpenAI-format error response (the response must not have started)."""
    body = error_body(message, type=type, code=code, param=param)
    raw_headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        seconds = max(0.0, retry_after)
        raw_headers.append((b"retry-after", str(math.ceil(seconds)).encode()))
        raw_headers.append((b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()))
    if should_retry is not None:
        raw_headers.append((b"x-should-retry", b"true" if should_retry else b"false"))
    raw_headers.extend(headers)
    if ctx is not None:
        ctx.status = status
        if outcome is not None:
            ctx.outcome = outcome
        elif ctx.outcome is None:
            ctx.outcome = default_outcome(status)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
