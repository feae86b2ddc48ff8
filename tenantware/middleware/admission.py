"""Whose turn is it? Fair-share admission of requests to a bounded upstream capacity.

While a seat is free and nobody waits, a request passes at once. Otherwise it waits in its
tenant's queue and the virtual-token-counter scheduler (``tenantware.admission.core``) picks
who goes next at each released seat. The charge is the estimate at dispatch
(prompt + output weight x output estimate), corrected with the actual usage when the inner app
returns; a stream is also charged as it goes (every ``_CHARGE_EVERY_S``), so a long stream
does not leave its tenant's counter stale until it ends. A client that disconnects while
queued leaves at once and is charged nothing. The output estimate is the tenant's recent
average output, capped by ``max_tokens``; the expected seat hold time (which decides whether
the request may borrow protected seats) comes from ``max_tokens`` and the pool's speed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Final

import anyio
from prometheus_client import Gauge, Histogram

from tenantware import metrics
from tenantware.admission.core import BAND_INDEX, BANDS, QUEUE_FULL, QUEUED, Ticket
from tenantware.admission.holdtime import HoldTimes
from tenantware.admission.pools import AdmissionPools
from tenantware.admission.store import UNAVAILABLE, SeatStore
from tenantware.config import AdmissionSettings
from tenantware.context import Outcome, RequestContext, get_context
from tenantware.errors import GatewayError
from tenantware.metering.billing import final_outcome
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AdmissionMiddleware"]

_PRIORITY_HEADER: Final = b"x-request-priority"
_BAND_OF_HEADER: Final = {name.encode(): i for i, name in enumerate(BANDS)}
_WAIT_HEADER: Final = b"x-tenantware-queue-wait-ms"
#: The one queue of the ``fifo`` scheduler.
_FIFO: Final = "*"
#: A stream's tenant counter is brought up to what it has streamed at most this often.
_CHARGE_EVERY_S: Final = 0.5
#: One SSE event of a streamed completion carries about one output token.
_EVENT: Final = b"data: {"


class AdmissionMiddleware:
    """Pure ASGI: ``AdmissionMiddleware(app, live=live)`` (memory) or ``pools=`` (shared)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        live: LiveConfig,
        pools: AdmissionPools | None = None,
        settings: AdmissionSettings | None = None,
    ) -> None:
        self.app = app
        self.live = live
        self.pools = pools or AdmissionPools(settings or live.current.config.admission)
        #: The configuration version whose admission settings the pools have (a reload that
        #: changes them is applied by the first request that sees it).
        self._version = live.current.version
        #: Expected seat hold times per pool, learned from answered requests.
        self.holds = HoldTimes()
        self._gauges: dict[str, tuple[Gauge, Gauge, Histogram]] = {}

    async def state(self) -> dict[str, Any]:
        """Per pool: seats in use, requests waiting, per-tenant counter, seats and queue."""
        return await self.pools.state()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if ctx.tenant is None or ctx.view is None:
            await self.app(scope, receive, send)
            return
        snapshot = self.live.current
        pools = self.pools
        if snapshot.version != self._version:
            self._version = snapshot.version
            if snapshot.config.admission != pools.settings:
                pools.reconfigure(snapshot.config.admission)
        settings = pools.settings
        routes = snapshot.routes.get(ctx.model or "")
        found = pools.store_for(routes[0].name if routes else None)
        if found is None:
            await self.app(scope, receive, send)
            return
        pool, store = found
        tenant = ctx.tenant
        terms = pools.terms(tenant)
        band = BAND_INDEX[settings.default_priority]
        for name, value in scope["headers"]:
            if name == _PRIORITY_HEADER:
                band = _BAND_OF_HEADER.get(value.strip().lower(), band)
                break
        if band < terms.max_band:
            band = terms.max_band
        ctx.priority = BANDS[band]
        output_weight = settings.output_weight
        max_output = ctx.view.output_cap or snapshot.config.gateway.default_max_tokens
        output = pools.output_estimate(tenant.id, max_output)
        short_s = settings.short_request_s
        prompt = ctx.estimated_prompt_tokens
        cost = prompt + output_weight * output
        if settings.scheduler == "fifo":
            ticket = Ticket(_FIFO, 1.0, cost, tokens=prompt + output)
        else:
            ticket = Ticket(
                tenant.id,
                tenant.weight,
                cost,
                band=band,
                reserved=terms.reserved,
                cap=terms.cap,
                tokens=prompt + output,
                hold=self.holds.estimate(pool, max_output) if short_s else 0.0,
            )
        gauges = self._gauges.get(tenant.id)
        if gauges is None:
            gauges = self._gauges[tenant.id] = (
                metrics.QUEUE_DEPTH.labels(tenant.id),
                metrics.SEATS_IN_USE.labels(tenant.id),
                metrics.QUEUE_WAIT_SECONDS.labels(tenant.id),
            )
        status = await store.acquire(ticket)
        if status == UNAVAILABLE:  # the shared store is down and its policy is ``closed``
            metrics.REJECTIONS.labels(tenant.id, "store_unavailable").inc()
            await GatewayError(
                503,
                "The gateway cannot reach its capacity store. Please retry.",
                type="server_error",
                code="store_unavailable",
                outcome=Outcome.REJECTED_QUEUE,
                retry_after=1.0,
                should_retry=True,
            ).send(send, ctx)
            return
        if status == QUEUE_FULL:
            metrics.REJECTIONS.labels(tenant.id, "queue_full").inc()
            # Sent here, not raised: the error passes the outer layers' ``send`` (the quota
            # layer's ``x-ratelimit-*`` headers), like the quota and breaker rejections.
            await GatewayError(
                429,
                "Too many requests of this organization are waiting for capacity. "
                "Retry after the delay given in retry-after.",
                type="requests",
                code="rate_limit_exceeded",
                outcome=Outcome.REJECTED_QUEUE,
                retry_after=1.0,
                should_retry=True,
            ).send(send, ctx)
            return
        if status == QUEUED:
            try:
                after = await self._wait(store, ticket, ctx, receive, gauges)
            except GatewayError as error:
                await error.send(send, ctx)
                return
            if after is None:
                return
            receive = after
            wait_header = (_WAIT_HEADER, str(round(ctx.queue_wait_s * 1000)).encode())
            inner_send = send

            def send(message: Message) -> Awaitable[None]:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), wait_header]
                return inner_send(message)

        else:
            gauges[2].observe(0.0)
        gauges[1].inc()
        granted_at = time.perf_counter() if short_s else 0.0
        if ctx.view.stream:
            send = self._charging(send, store, ticket, prompt, output_weight)
        try:
            await self.app(scope, receive, send)
        finally:
            # Nothing reported (the request failed before the upstream answered): no charge.
            usage = ctx.usage
            actual = tokens = 0.0
            if usage is not None:
                actual = usage.input_tokens + output_weight * usage.output_tokens
                tokens = usage.input_tokens + usage.output_tokens
                if final_outcome(ctx) == Outcome.OK:
                    # Failures (empty usage) and cut streams say nothing of answer lengths.
                    pools.observe_output(tenant.id, usage.output_tokens)
                    if short_s:
                        done = time.perf_counter()
                        first = (ctx.first_byte_at or done) - granted_at
                        self.holds.observe(pool, first, done - granted_at, usage.output_tokens)
            gauges[1].dec()
            joined = ctx.after_response
            if not store.yields:
                await store.release(ticket, actual, tokens)
            elif joined is not None:
                # Sent now; the quota layer's settle joins it in the same write and awaits it.
                joined.append(store.start_release(ticket, actual, tokens))
            else:
                with anyio.CancelScope(shield=True):
                    await store.release(ticket, actual, tokens)

    def _charging(
        self, send: Send, store: SeatStore, ticket: Ticket, prompt: int, output_weight: float
    ) -> Send:
        """Wrap ``send`` of a stream: charge what it streamed beyond its charge, periodically."""
        streamed = 0
        due = time.perf_counter() + _CHARGE_EVERY_S

        async def send_then_charge(message: Message, extra: float) -> None:
            await send(message)
            await store.charge(ticket, extra)

        def charging(message: Message) -> Awaitable[None]:
            # A plain function returning ``send``'s awaitable: a coroutine only when a charge
            # is due, not one per event.
            nonlocal streamed, due
            if message["type"] == "http.response.body":
                streamed += message.get("body", b"").count(_EVENT)
                now = time.perf_counter()
                if now >= due:
                    due = now + _CHARGE_EVERY_S
                    extra = prompt + output_weight * streamed - ticket.cost
                    if extra > 0:
                        return send_then_charge(message, extra)
            return send(message)

        return charging

    async def _wait(
        self,
        store: SeatStore,
        ticket: Ticket,
        ctx: RequestContext,
        receive: Receive,
        gauges: tuple[Gauge, Gauge, Histogram],
    ) -> Receive | None:
        """Wait for a seat while watching the client; the receive for the inner app.

        The tenant layer's ``receive`` replays the body first, so what is read here while
        waiting is kept and replayed again; an ``http.disconnect`` ends the wait at once
        (``None``: the ticket is withdrawn, nothing charged, nothing sent).
        """
        assert ctx.tenant is not None
        started = time.perf_counter()
        buffered: list[Message] = []
        gone = False
        granted = False
        gauges[0].inc()
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    nonlocal gone
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            gone = True
                            group.cancel_scope.cancel()
                            return
                        buffered.append(message)

                group.start_soon(watch)
                with anyio.move_on_after(ctx.tenant.max_queue_wait_s):
                    await store.wait(ticket)
                    granted = True
                group.cancel_scope.cancel()
        finally:
            gauges[0].dec()
            if gone or not granted:
                with anyio.CancelScope(shield=True):
                    await store.cancel(ticket)
        waited = time.perf_counter() - started
        ctx.queue_wait_s = waited
        gauges[2].observe(waited)
        if gone:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
            return None
        if not granted:
            metrics.REJECTIONS.labels(ctx.tenant.id, "queue_timeout").inc()
            raise GatewayError(
                503,
                "The service is at capacity and your request waited too long in the queue. "
                "Please retry later.",
                type="server_error",
                code="queue_timeout",
                outcome=Outcome.REJECTED_QUEUE,
                retry_after=1.0,
                should_retry=True,
            )
        if not buffered:
            return receive

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            return await receive()

        return replay
