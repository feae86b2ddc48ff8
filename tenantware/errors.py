"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

A request that came in Anthropic's format (``RequestContext.wire_format``, set by the tenant
layer from the path) gets Anthropic's shape instead, ``{"type": "error", "error": {"type",
"message"}}``, with the type its SDK expects for the status: every layer's refusal (tenant,
quota, admission, breaker, proxy) goes through ``send_error`` and so speaks the client's format
without knowing it.

The official SDKs pick their exception class from the status code and decide whether to retry
from ``x-should-retry`` and ``retry-after``; every error tenantware sends sets them on purpose.
How errors flow between layers is written at the top of ``tenantware.context``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import msgspec

from tenantware.context import Outcome, OutcomeName, RequestContext, Unavailable, default_outcome
from tenantware.types import Send

__all__ = [
    "GatewayError",
    "anthropic_error_body",
    "anthropic_error_type",
    "circuit_open_error",
    "default_outcome",
    "error_body",
    "internal_error",
    "send_error",
]


class _ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorDetail


class _AnthropicDetail(msgspec.Struct):
    type: str
    message: str


class _AnthropicEnvelope(msgspec.Struct, omit_defaults=True):
    type: str
    error: _AnthropicDetail
    request_id: str | None = None


#: Anthropic's error type per status (its SDK picks the exception class from the status).
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")


class GatewayError(Exception):
    """An answer to send instead of going on: raised and caught inside one layer (or raised
    by an app behind the stack as its answer), never across layers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        outcome: OutcomeName | None = None,
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


#: Per ``Unavailable`` reason: the error code, and what happened in words.
_UNAVAILABLE: Final[dict[Unavailable, tuple[str, str]]] = {
    "open": ("circuit_open", "its upstreams keep failing and the circuit breaker is open"),
    "cooling": (
        "upstream_cooling",
        "its upstreams answered 429 (rate limited) and are cooling down for the retry-after "
        "they asked for",
    ),
    "open_and_cooling": (
        "circuit_open_and_cooling",
        "some of its upstreams keep failing (circuit breaker open) and the others are "
        "cooling down after a 429 (rate limited)",
    ),
}


def circuit_open_error(model: str, wait_s: float, why: Unavailable) -> GatewayError:
    """503 for a model whose deployments (and allowed fallbacks) are all open or cooling.

    Takes the breaker's decision (``breaker.board.CircuitOpen``) field by field: errors sit
    below every domain package. The code and message say which it was; ``retry-after`` is
    the exact wait."""
    code, what = _UNAVAILABLE[why]
    return GatewayError(
        503,
        f"The model `{model}` is temporarily unavailable: {what}. Retry in {math.ceil(wait_s)} s.",
        type="server_error",
        code=code,
        outcome=Outcome.BREAKER_OPEN,
        retry_after=wait_s,
        should_retry=True,
    )


def internal_error() -> GatewayError:
    """500 for a stray exception: nothing about it is told to the client (it is logged)."""
    return GatewayError(
        500,
        "The gateway failed to process your request. Please retry.",
        type="server_error",
        code="internal_error",
        outcome=Outcome.ERROR,
        should_retry=True,
    )


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    """The JSON body of an OpenAI-format error."""
    return _encode(_ErrorEnvelope(_ErrorDetail(message=message, type=type, param=param, code=code)))


def anthropic_error_type(status: int) -> str:
    """The Anthropic error type of an HTTP status."""
    found = _ANTHROPIC_TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    """The JSON body of an Anthropic-format error."""
    detail = _AnthropicDetail(type=anthropic_error_type(status), message=message)
    return _encode(_AnthropicEnvelope(type="error", error=detail, request_id=request_id))


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    ctx: RequestContext | None = None,
    outcome: OutcomeName | None = None,
    retry_after: float | None = None,
    should_retry: bool | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete error response in the client's format (the response must not have
    started): OpenAI's unless ``ctx`` says the request came in Anthropic's."""
    if ctx is not None and ctx.wire_format == "anthropic":
        body = anthropic_error_body(status, message, ctx.request_id)
    else:
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
