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
The seat request (``middleware.seats``) may come from the quota layer already asked, with
the pool's answer: on one Redis server the quota reservation carries it (one round trip),
and the quota layer's settle carries its release (this layer leaves the usage to release
with on the seat request).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Final

import anyio
from prometheus_client import Gauge, Histogram

from tenantware import metrics
from tenantware.admission.core import QUEUE_FULL, QUEUED, Ticket
from tenantware.admission.pools import AdmissionPools
from tenantware.admission.store import UNAVAILABLE, SeatStore
from tenantware.config import AdmissionSettings
from tenantware.context import Outcome, RequestContext, get_context
from tenantware.errors import GatewayError
from tenantware.metering.billing import final_outcome
from tenantware.middleware.seats import SeatRequest, seat_request
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AdmissionMiddleware"]

_WAIT_HEADER: Final = b"x-tenantware-queue-wait-ms"
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
        # The pools' settings stand for the configuration as it is now (settings given here
        # win over it); a reload that changes them is applied by the first request to see it.
        self.pools.follow(live.current.version, self.pools.settings)
        self._gauges: dict[str, tuple[Gauge, Gauge, Histogram]] = {}

    async def state(self) -> dict[str, Any]:
        """Per pool: seats in use, requests waiting, per-tenant counter, seats and queue."""
        return await self.pools.state()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        request = ctx.seat_request
        handed = isinstance(request, SeatRequest)
        if isinstance(request, SeatRequest):
            ctx.seat_request = None  # taken: this layer uses it, the quota layer releases it
        else:
            request = seat_request(self.pools, self.live.current, ctx, scope)
            if request is None:
                await self.app(scope, receive, send)
                return
        tenant = ctx.tenant
        view = ctx.view
        assert tenant is not None  # a seat request needs a tenant and a decoded request
        assert view is not None
        pools = self.pools
        pool, store, ticket = request.pool, request.store, request.ticket
        settings = request.settings
        output_weight = settings.output_weight
        short_s = settings.short_request_s
        prompt = ctx.estimated_prompt_tokens
        ctx.priority = request.priority
        gauges = self._gauges.get(tenant.id)
        if gauges is None:
            gauges = self._gauges[tenant.id] = (
                metrics.QUEUE_DEPTH.labels(tenant.id),
                metrics.SEATS_IN_USE.labels(tenant.id),
                metrics.QUEUE_WAIT_SECONDS.labels(tenant.id),
            )
        # Asked already when the quota layer's reservation call carried the seat request.
        status = request.status
        if status is None:
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
        if view.stream:
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
                        pools.holds.observe(pool, first, done - granted_at, usage.output_tokens)
            gauges[1].dec()
            joined = ctx.after_response
            if not store.yields:
                await store.release(ticket, actual, tokens)
            elif joined is not None and handed:
                # The quota layer asked for this seat: it releases it with its settle.
                request.usage = (actual, tokens)
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
