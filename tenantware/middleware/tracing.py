"""Where did this request's time go? One OpenTelemetry server span per request.

Outermost layer, mounted only when tracing is on (``tenantware.tracing``): it continues the
caller's trace from ``traceparent``, makes its span current for everything inside (the
proxy's upstream attempts become its children and carry it on to the upstream), and when the
request ends copies what the other layers wrote in the request context onto the span:
tenant, models, upstream, outcome, tokens, cost, queue wait, the quota decision. Never the
body, never a key.
"""

from __future__ import annotations

from typing import Any

from tenantware.context import Outcome, RequestContext, context_of
from tenantware.metering.billing import request_cost
from tenantware.state import LiveConfig
from tenantware.tracing import QUOTA_DECISION, Tracing
from tenantware.types import ASGIApp, Receive, Scope, Send

__all__ = ["TracingMiddleware", "span_attributes"]

#: Outcomes that are the gateway's (or its upstream's) failure, not the client's.
_ERROR_OUTCOMES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR})


class TracingMiddleware:
    """Pure ASGI: ``TracingMiddleware(app, live=live, tracing=open_tracing(settings))``."""

    def __init__(self, app: ASGIApp, *, live: LiveConfig, tracing: Tracing) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.app = app
        self.live = live
        self.tracing = tracing
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracing = self.tracing
        method = scope["method"]
        with tracing.tracer.start_as_current_span(
            method,
            context=tracing.extract(scope["headers"]),
            kind=self._server,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, send)
            finally:
                ctx = context_of(scope)
                if ctx is not None and span.is_recording():
                    if ctx.api_route:
                        span.update_name(f"{method} {scope['path']}")
                    span.set_attributes(span_attributes(ctx, self.live))
                    if ctx.outcome in _ERROR_OUTCOMES or ctx.status >= 500:
                        span.set_status(self._error)


def span_attributes(ctx: RequestContext, live: LiveConfig) -> dict[str, Any]:
    """What a finished request's span says about it (attributes that are unset are left out)."""
    attributes: dict[str, Any] = {
        "http.response.status_code": ctx.status,
        "tenantware.request_id": ctx.request_id,
        "tenantware.queue_wait_s": ctx.queue_wait_s,
    }
    optional = {
        "tenantware.outcome": ctx.outcome,
        "tenantware.tenant": ctx.tenant_id,
        "tenantware.key_id": ctx.key_id,
        "tenantware.model": ctx.model,
        "tenantware.model_served": ctx.model_served,
        "tenantware.upstream": ctx.upstream,
        "tenantware.priority": ctx.priority,
        "tenantware.upstream_latency_s": ctx.upstream_latency_s,
    }
    attributes.update((name, value) for name, value in optional.items() if value is not None)
    if ctx.view is not None:
        attributes["tenantware.stream"] = ctx.view.stream
    usage = ctx.usage
    if usage is not None:
        attributes["tenantware.usage.input_tokens"] = usage.input_tokens
        attributes["tenantware.usage.output_tokens"] = usage.output_tokens
        attributes["tenantware.usage.cached_tokens"] = usage.cached_tokens
        attributes["tenantware.usage.estimated"] = usage.estimated
    if ctx.tenant is not None:
        attributes["tenantware.cost_nanousd"] = request_cost(ctx, live.current.catalogue)
    decision = ctx.extra.get(QUOTA_DECISION)
    if decision is not None:
        allowed, source, limit = decision
        attributes["tenantware.quota.decision"] = "allowed" if allowed else "refused"
        attributes["tenantware.quota.source"] = source
        if limit:
            attributes["tenantware.quota.limit"] = limit
    return attributes
