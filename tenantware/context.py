"""The one per-request object every layer shares, stored at ``scope["tenantware"]``.

The body is read and decoded once (into ``RequestView``) by the tenant layer; every later
layer reads fields here instead of re-parsing JSON or headers.

The error-flow rule
-------------------
- A layer sends its own refusals (``send_error`` or ``GatewayError.send``) through the
  ``send`` it was given, so they pass the outer layers' ``send`` wrappers (request id,
  ``x-ratelimit-*`` headers) like any answer. ``GatewayError`` is raised and caught inside one
  layer; it never crosses a layer boundary.
- An app behind the stack may raise ``GatewayError`` as its answer: the layer nearest the app
  answers it as if the app had sent it (the breaker layer; the quota layer when the breaker
  is off, the admission layer in between only passing it on).
- Only the outermost layer (``TenantMiddleware``) and ``ProxyApp`` catch stray exceptions:
  an OpenAI-shaped 500 when nothing was sent yet. Every other layer lets them pass (its
  ``finally`` settles what it holds) and reads the result from this context.
- Domain packages (``quota/``, ``admission/``, ``breaker/``, ``metering/ledger/``,
  ``backends/``) never build HTTP errors: they return decisions (``quota.Decision`` with its
  ``DecisionSource``, ``breaker.board.CircuitOpen``) that a middleware or the proxy maps to a
  response.

Who writes and who reads each field of ``RequestContext``
---------------------------------------------------------
=========================  ===================================  ===============================
field                      written by                           read by
=========================  ===================================  ===============================
request_id, started_at,    tenant (on creation)                 metering, proxy
unix_time
api_route                  tenant                               tenant
wire_format                tenant (from the path)               errors (error shape), proxy
tenant, key_id             tenant                               every layer, proxy, routes
body, view,                tenant (decoded once)                quota, admission, proxy
estimated_prompt_tokens                                         metering
model                      tenant (aliases resolved)            every layer, proxy, billing
response_started, status   tenant's ``send`` wrapper (every     every layer, proxy, billing
                           response); ``send_error``
outcome                    whoever answers: tenant, cache,      metering, quota, admission,
                           quota, admission, breaker (via       billing
                           ``send_error``), proxy; metering
                           settles it last (``final_outcome``)
priority, queue_wait_s     admission                            admission, metering
upstream, model_served,    proxy (or metering's tap for         metering, quota (settle),
usage, first_byte_at,      another app)                         admission (release), billing
upstream_latency_s
cost_nanousd               quota (settled cost)                 metering (billing)
balance_debit_nanousd      quota (prepaid balance settled)      metering (balance journal)
own_upstream_key           proxy (the tenant's own key was      quota (settle), metering,
                           used for the call that answered)     billing (not charged)
extra                      proxy (``breaker.board.RECORDED``)   breaker
after_response             quota (opens it: its settle goes     admission (adds its release),
                           out after the response); admission   quota (sends them with its
                                                                settle, in one write)
seat_request               quota (the seat request its          admission (takes it: clears
                           reservation call carried, with the   it, answers it, leaves its
                           pool's answer; single Redis)         release's usage on it); quota
                                                                (releases it with its settle,
                                                                or one not taken)
=========================  ===================================  ===============================
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Final, Literal

import msgspec

from tenantware.registry import TenantView

__all__ = [
    "SCOPE_KEY",
    "DecisionSource",
    "Outcome",
    "OutcomeName",
    "RequestContext",
    "RequestView",
    "StreamOptions",
    "Unavailable",
    "Usage",
    "WireFormat",
    "context_of",
    "default_outcome",
    "get_context",
]

SCOPE_KEY: Final = "tenantware"

#: The API a request speaks: ``openai`` (chat completions and the rest), ``anthropic``
#: (Messages) or ``responses`` (OpenAI's Responses API). Every layer works on the same view;
#: only the edges (the inbound route, the error writer, the upstream adapter in
#: ``tenantware.formats``) look at it.
WireFormat = Literal["openai", "anthropic", "responses"]


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
    #: The Responses API's output cap.
    max_output_tokens: int | None = None
    stream_options: StreamOptions | None = None
    messages: list[msgspec.Raw] | None = None
    #: Raw JSON (empty when absent): forwarded as is, never decoded.
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    n: int | None = None

    @property
    def output_cap(self) -> int | None:
        """The most output tokens the client allowed, if it said."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        if self.max_tokens is not None:
            return self.max_tokens
        return self.max_output_tokens


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
    #: The part of ``input_tokens`` written to the prompt cache (Anthropic bills it apart).
    cache_write_tokens: int = 0


#: How a request ended, as written to logs, metrics and the ledger (``Outcome`` names them).
OutcomeName = Literal[
    "ok",
    "client_disconnected",
    "upstream_error",
    "upstream_timeout",
    "rejected_auth",
    "rejected_request",
    "rejected_quota",
    "rejected_budget",
    "rejected_queue",
    "breaker_open",
    "error",
    "cached",
]

#: Who decided a policy layer's answer: its shared ``store``, the ``local`` fallback limiter
#: while the store is unreachable, or the failure policy itself (``open``: let it pass,
#: ``closed``: refuse).
DecisionSource = Literal["store", "local", "open", "closed"]

#: Why no deployment of a model may take a call (``breaker.board.CircuitOpen.why``): their
#: circuits are ``open`` (failing), they are ``cooling`` after an upstream 429, or some of each.
Unavailable = Literal["open", "cooling", "open_and_cooling"]


class Outcome:
    """The ``OutcomeName`` values as constants."""

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
    #: Answered from the tenant's response cache (no upstream call).
    CACHED: Final = "cached"


class RequestContext:
    """Mutable state of one request; created by ``TenantMiddleware``. Which layer writes each
    field and who reads it: the table at the top of this module."""

    __slots__ = (
        "after_response",
        "api_route",
        "balance_debit_nanousd",
        "body",
        "cost_nanousd",
        "estimated_prompt_tokens",
        "extra",
        "first_byte_at",
        "key_id",
        "model",
        "model_served",
        "outcome",
        "own_upstream_key",
        "priority",
        "queue_wait_s",
        "request_id",
        "response_started",
        "seat_request",
        "started_at",
        "status",
        "tenant",
        "unix_time",
        "upstream",
        "upstream_latency_s",
        "usage",
        "view",
        "wire_format",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started_at = time.perf_counter()
        self.unix_time = time.time()
        self.api_route = False
        #: The client's API (``/v1/messages``: anthropic); errors are written in its shape.
        self.wire_format: WireFormat = "openai"
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
        self.outcome: OutcomeName | None = None
        self.usage: Usage | None = None
        self.cost_nanousd: int | None = None
        #: What the tenant's prepaid balance paid (``None``: no balance was debited).
        self.balance_debit_nanousd: int | None = None
        #: The answering call used the tenant's own upstream key: metered, not charged.
        self.own_upstream_key = False
        self.queue_wait_s = 0.0
        self.upstream_latency_s: float | None = None
        self.first_byte_at: float | None = None
        self.response_started = False
        #: Room for later layers (admin, shadow traffic) without changing this class.
        self.extra: dict[str, Any] = {}
        #: Store calls inner layers sent as they ended, for the quota layer to await after
        #: its settle (``None``: no outer layer will, each layer awaits its own).
        self.after_response: list[Awaitable[None]] | None = None
        #: A ``middleware.seats.SeatRequest`` the quota layer already asked the pool for
        #: (typed loosely: this module sits below the admission package).
        self.seat_request: object | None = None

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.id if self.tenant is not None else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at

    def flag(self, name: str, default: bool = False) -> bool:
        """The tenant's feature flag ``name`` (its own over its tier's), for the app."""
        tenant = self.tenant
        return tenant.flags.get(name, default) if tenant is not None else default


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


def default_outcome(status: int) -> OutcomeName:
    """The outcome of an error that names none: a 4xx refuses the request, anything else is
    an error (so a validation 400 is recorded like the tenant layer's own refusals)."""
    return Outcome.REJECTED_REQUEST if 400 <= status < 500 else Outcome.ERROR
