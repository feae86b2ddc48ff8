"""The one per-request object every layer shares, stored at ``scope["tenantware"]``.

The body is read and decoded once (into ``RequestView``) by the tenant layer; every later
layer reads fields here instead of re-parsing JSON or headers.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

from tenantware.registry import TenantView

__all__ = [
    "SCOPE_KEY",
    "Outcome",
    "RequestContext",
    "RequestView",
    "StreamOptions",
    "Usage",
    "context_of",
    "get_context",
]

SCOPE_KEY: Final = "tenantware"


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class RequestView(msgspec.Struct):
    """The few fields of an OpenAI-style request body that the gateway acts on.

    Everything else in the body is skipped by the decoder and forwarded byte for byte.
    """

    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    messages: list[msgspec.Raw] | None = None
    #: Raw JSON (empty when absent): forwarded as is, never decoded.
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    n: int | None = None

    @property
    def output_cap(self) -> int | None:
        """The most output tokens the client allowed, if it said."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class Usage(msgspec.Struct):
    """Tokens one request used; ``estimated`` when the upstream did not report them.

    ``anomalies`` names what was wrong with the upstream's numbers when they had to be clamped
    or replaced (``tenantware.metering.usage``): the record is then marked ``usage_invalid``.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    anomalies: tuple[str, ...] = ()


class Outcome:
    """How a request ended, as written to logs, metrics and the ledger."""

    OK: Final = "ok"
    CLIENT_DISCONNECTED: Final = "client_disconnected"
    UPSTREAM_ERROR: Final = "upstream_error"
    UPSTREAM_TIMEOUT: Final = "upstream_timeout"
    REJECTED_AUTH: Final = "rejected_auth"
    REJECTED_REQUEST: Final = "rejected_request"
    REJECTED_QUOTA: Final = "rejected_quota"
    REJECTED_BUDGET: Final = "rejected_budget"
    REJECTED_QUEUE: Final = "rejected_queue"
    BREAKER_OPEN: Final = "breaker_open"
    ERROR: Final = "error"


class RequestContext:
    """Mutable state of one request; created by ``TenantMiddleware``."""

    __slots__ = (
        "api_route",
        "body",
        "cost_nanousd",
        "estimated_prompt_tokens",
        "extra",
        "first_byte_at",
        "key_id",
        "model",
        "model_served",
        "outcome",
        "priority",
        "queue_wait_s",
        "request_id",
        "response_started",
        "started_at",
        "status",
        "tenant",
        "unix_time",
        "upstream",
        "upstream_latency_s",
        "usage",
        "view",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started_at = time.perf_counter()
        self.unix_time = time.time()
        self.api_route = False
        self.tenant: TenantView | None = None
        self.key_id: str | None = None
        self.body: bytes = b""
        self.view: RequestView | None = None
        #: Canonical model requested (aliases resolved).
        self.model: str | None = None
        #: Model that actually answered (differs after a fallback).
        self.model_served: str | None = None
        self.upstream: str | None = None
        self.priority: str | None = None
        self.estimated_prompt_tokens = 0
        self.status = 0
        self.outcome: str | None = None
        self.usage: Usage | None = None
        self.cost_nanousd: int | None = None
        self.queue_wait_s = 0.0
        self.upstream_latency_s: float | None = None
        self.first_byte_at: float | None = None
        self.response_started = False
        #: Room for later layers (admin, shadow traffic) without changing this class.
        self.extra: dict[str, Any] = {}

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.id if self.tenant is not None else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at


def context_of(scope: Any) -> RequestContext | None:
    """The request context of an ASGI scope, or ``None`` outside the tenant layer."""
    ctx = scope.get(SCOPE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None


def get_context(scope: Any) -> RequestContext:
    """The request context of an ASGI scope; raises when ``TenantMiddleware`` is not mounted."""
    ctx = scope.get(SCOPE_KEY)
    if not isinstance(ctx, RequestContext):
        raise LookupError("no tenantware context in scope: is TenantMiddleware mounted outermost?")
    return ctx
