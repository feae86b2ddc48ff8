"""What did it cost? Turns every finished API request into one usage record.

Second layer from the outside (after the tenant layer), so it also records what the policy
layers inside it reject. It never buffers a response: ``send`` passes straight through. The
bundled proxy reports usage in the request context itself (it sees the upstream stream, hides
the usage chunk a client did not ask for and estimates cut streams); for any other inner app
(one that does not set ``ctx.upstream`` before answering) this layer taps the response as it
passes: JSON ``usage`` or the SSE usage chunk.

Where are the upstream's numbers checked? Around the inner app this layer sets the request's
``UsageBounds`` (``USAGE_BOUNDS``), which every usage parser below it applies as it reads
(the proxy's included), so the quota layer settles and the ledger bills the same clamped
usage. A successful completion that reported no usage is billed by the estimator. Usage that
had to be clamped or estimated is counted per upstream and kind and logged at a bounded rate.

After the app returns, the record is built from the context (a few attribute reads and one
struct) and handed to the ledger writer's in-memory queue: no I/O, no await on the request
path. Metrics and the per-request log line are produced by the writer, off the request path.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable
from typing import Final

from tenantware.context import Outcome, RequestContext, Usage, get_context
from tenantware.metering.billing import billable_usage, charge, final_outcome, request_cost
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.ledger.writer import LedgerWriter
from tenantware.metering.telemetry import AnomalyReporter
from tenantware.metering.usage import (
    USAGE_BOUNDS,
    StreamTap,
    UsageBounds,
    bound_usage,
    estimate_json_usage,
    parse_json_usage,
)
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MeteringMiddleware", "UsageRecorder"]

_NO_TAP: Final = 0
_TAP_JSON: Final = 1
_TAP_SSE: Final = 2
_MAX_TAPPED_JSON: Final = 8 * 1024 * 1024
#: A cost center from a header: short and plain (it ends up in CSV exports and logs).
_COST_CENTER: Final = re.compile(rb"[A-Za-z0-9 _.:/&+-]{1,64}")


class _Ids:
    """Record ids unique across processes: a random per-process prefix and a counter."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex() + "-"
        self._next = itertools.count(1).__next__

    def new(self) -> str:
        return self._prefix + str(self._next())


class MeteringMiddleware:
    """Pure ASGI: ``MeteringMiddleware(app, live=live, writer=LedgerWriter(ledger))``."""

    def __init__(self, app: ASGIApp, *, live: LiveConfig, writer: LedgerWriter) -> None:
        self.app = app
        self.live = live
        self.writer = writer
        self.recorder = UsageRecorder(live, writer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if ctx.tenant is None:
            await self.app(scope, receive, send)
            return
        bounds = UsageBounds.for_request(ctx, self.live.current.config.metering.max_output_tokens)
        bounds_set = USAGE_BOUNDS.set(bounds)
        tap_kind = _NO_TAP
        json_parts: list[bytes] = []
        json_size = 0
        sse_tap: StreamTap | None = None
        is_stream = False

        def finish_tap() -> None:
            # Runs when the last body byte passes, so the inner quota layer settles with the
            # tapped usage; again (a no-op) when the app returns or raises.
            nonlocal tap_kind
            if ctx.usage is None and tap_kind:
                if tap_kind == _TAP_SSE:
                    assert sse_tap is not None
                    ctx.usage = sse_tap.usage
                    if ctx.usage is None and (sse_tap.content_chars or ctx.model is not None):
                        # No usage chunk (a cut stream, an upstream that sends none): count
                        # what was relayed.
                        ctx.usage = Usage(
                            input_tokens=bounds.prompt_estimate,
                            output_tokens=min(sse_tap.estimated_output_tokens(), bounds.max_output),
                            estimated=True,
                        )
                    ctx.model_served = ctx.model_served or sse_tap.model
                else:
                    body = b"".join(json_parts)
                    ctx.usage, served = parse_json_usage(body, bounds)
                    ctx.model_served = ctx.model_served or served
                    if ctx.usage is None and ctx.model is not None:
                        # A completion answered without usage: billed by the estimator.
                        ctx.usage = estimate_json_usage(body, bounds)
            tap_kind = _NO_TAP

        def metered_send(message: Message) -> Awaitable[None]:
            # A plain function returning the inner send's awaitable: no coroutine of its own
            # per message (every SSE event of every stream passes here).
            nonlocal tap_kind, sse_tap, json_size, is_stream
            kind = message["type"]
            if kind == "http.response.body":
                if tap_kind:
                    body = message.get("body", b"")
                    if tap_kind == _TAP_SSE:
                        assert sse_tap is not None
                        if body and ctx.first_byte_at is None:
                            ctx.first_byte_at = time.perf_counter()
                        sse_tap.feed(body)
                    elif json_size + len(body) <= _MAX_TAPPED_JSON:
                        json_parts.append(body)
                        json_size += len(body)
                    if not message.get("more_body", False):
                        finish_tap()
            elif kind == "http.response.start":
                content_type = b""
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value
                        break
                is_stream = b"event-stream" in content_type
                # The proxy (or any app that names its upstream) reports usage itself; when
                # its JSON answer had none, the body is tapped for the estimator.
                if message["status"] < 400:
                    if ctx.upstream is None:
                        if is_stream:
                            tap_kind, sse_tap = _TAP_SSE, StreamTap(bounds=bounds)
                        elif b"json" in content_type:
                            tap_kind = _TAP_JSON
                    elif ctx.usage is None and not is_stream and b"json" in content_type:
                        tap_kind = _TAP_JSON
            return send(message)

        try:
            await self.app(scope, receive, metered_send)
        except BaseException:
            if ctx.outcome is None:
                ctx.outcome = Outcome.ERROR
            if not ctx.response_started:
                ctx.status = 500
            raise
        finally:
            USAGE_BOUNDS.reset(bounds_set)
            finish_tap()
            usage = ctx.usage
            if usage is not None:
                # An app that set usage itself, bypassing the parsers: checked here; the
                # cost is then recomputed from the checked usage.
                checked = bound_usage(usage, bounds)
                if checked is not usage:
                    ctx.usage, ctx.cost_nanousd = checked, None
            ctx.outcome = final_outcome(ctx)
            self.writer.submit(self.recorder.build(ctx, scope, is_stream))


class UsageRecorder:
    """Turns a finished request's context into a usage record and queues it for the ledger.

    Shared by ``MeteringMiddleware`` and the tenant layer, which refuses some requests
    (bad body, model not allowed) before metering runs: those are recorded too, not billed.
    """

    __slots__ = ("_ids", "anomalies", "live", "writer")

    def __init__(self, live: LiveConfig, writer: LedgerWriter) -> None:
        self.live = live
        self.writer = writer
        self._ids = _Ids()
        self.anomalies = AnomalyReporter()

    def record_rejected(self, scope: Scope) -> None:
        """Record a request the tenant layer answered with an error (a known tenant only)."""
        ctx = get_context(scope)
        if ctx.tenant is not None:
            ctx.outcome = final_outcome(ctx)
            self.writer.submit(self.build(ctx, scope, False))

    def build(self, ctx: RequestContext, scope: Scope, is_stream: bool) -> UsageRecord:
        """The usage record of a finished request (no I/O)."""
        snapshot = self.live.current
        tenant = ctx.tenant
        assert tenant is not None
        settings = snapshot.config.metering
        usage = billable_usage(ctx.outcome, ctx.usage)
        cost = request_cost(ctx, snapshot.catalogue)
        charged = charge(cost, settings.markup_percent.get(tenant.id), own_key=ctx.own_upstream_key)
        cost_center = tenant.cost_center
        header = settings.cost_center_header.lower().encode()
        for name, value in scope["headers"]:
            if name == header:
                if _COST_CENTER.fullmatch(value):
                    cost_center = value.decode("ascii")
                break
        if usage is not None and (
            usage.anomalies or (usage.estimated and ctx.outcome == Outcome.OK)
        ):
            # Rare: numbers that were clamped, or a completed request without usage.
            upstream = ctx.upstream or ""
            if upstream and all(u.name != upstream for u in snapshot.config.upstreams):
                upstream = "other"
            self.anomalies.report(
                upstream or "none",
                usage.anomalies or ("missing",),
                request_id=ctx.request_id,
                tenant=tenant.id,
                model=ctx.model_served or ctx.model or "",
            )
        first_byte = ctx.first_byte_at
        return UsageRecord(
            record_id=self._ids.new(),
            request_id=ctx.request_id,
            ts=ctx.unix_time,
            tenant=tenant.id,
            cost_center=cost_center,
            key_id=ctx.key_id or "",
            model_requested=ctx.model or "",
            model_served=ctx.model_served or "",
            upstream=ctx.upstream or "",
            status=ctx.status,
            outcome=ctx.outcome or Outcome.ERROR,
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            reasoning_tokens=usage.reasoning_tokens if usage else 0,
            cost_nanousd=cost,
            charged_nanousd=charged,
            queue_wait_s=ctx.queue_wait_s,
            upstream_latency_s=ctx.upstream_latency_s,
            latency_s=time.perf_counter() - ctx.started_at,
            ttft_s=(first_byte - ctx.started_at) if first_byte is not None else None,
            stream=is_stream,
            estimated=bool(usage and usage.estimated),
            usage_invalid=bool(usage and usage.anomalies),
            balance_debit_nanousd=ctx.balance_debit_nanousd or 0,
            own_upstream_key=ctx.own_upstream_key,
        )
