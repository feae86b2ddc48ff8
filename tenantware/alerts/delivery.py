"""Webhook delivery: one bounded queue and one worker per destination.

A destination gets a message when it may see the alert (an operator's: every alert; a
tenant's: that tenant's only) and the alert is severe enough for it. Each worker sends in
order, signed (``signing.py``), at most ``max_per_minute`` (a token bucket: a burst waits in
the queue), and retries a failed send with full-jitter exponential backoff up to
``max_attempts``; a 4xx other than 408/429 is final. A full queue drops the new message.
Every outcome goes to the history through ``record``.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio
import httpx
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tenantware.alerts.model import AlertEvent, EventKind
from tenantware.alerts.payload import Message, render
from tenantware.alerts.signing import SIGNATURE_HEADER, sign
from tenantware.config import AlertDestination, AlertSettings

__all__ = ["Dispatcher", "TokenBucket", "may_receive"]

log = structlog.get_logger("tenantware.alerts")

_SEVERITY: Final = {"info": 0, "warning": 1, "critical": 2}
_RETRIED_4XX: Final = frozenset({408, 429})
Recorder = Callable[[AlertEvent], Awaitable[None]]


def may_receive(destination: AlertDestination, message: Message) -> bool:
    """Whether ``destination`` gets ``message``: a tenant's webhook only its own alerts."""
    alert = message.alert
    if destination.tenant is not None and alert.tenant != destination.tenant:
        return False
    return _SEVERITY[alert.severity] >= _SEVERITY[destination.min_severity]


class TokenBucket:
    """``per_minute`` sends, refilled continuously; a send past it waits for its token."""

    __slots__ = ("capacity", "clock", "rate", "sleep", "stamp", "tokens")

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.clock = clock
        self.sleep = sleep
        self.stamp = clock()

    async def take(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await self.sleep((1.0 - self.tokens) / self.rate)


class _Lane:
    """One destination's queue and limiter."""

    __slots__ = ("bucket", "destination", "receive", "secret", "send")

    def __init__(
        self, destination: AlertDestination, size: int, secret: bytes | None = None
    ) -> None:
        self.destination = destination
        #: A registered webhook's own secret; a configured one reads ``secret_env``.
        self.secret = secret
        self.send: MemoryObjectSendStream[Message]
        self.receive: MemoryObjectReceiveStream[Message]
        self.send, self.receive = anyio.create_memory_object_stream[Message](size)
        self.bucket = TokenBucket(destination.max_per_minute)


class Dispatcher:
    """``Dispatcher(settings, client, record)``; ``run()`` runs the workers until cancelled."""

    def __init__(
        self,
        settings: AlertSettings,
        client: httpx.AsyncClient,
        record: Recorder,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.record = record
        self.rng = rng or random.Random()
        self.lanes = {d.id: _Lane(d, settings.queue_size) for d in settings.destinations}
        #: Ids of the lanes of registered webhooks (``sync`` adds and removes those only).
        self._registered: set[str] = set()
        self._group: TaskGroup | None = None

    def sync(self, registered: Sequence[tuple[AlertDestination, bytes]]) -> None:
        """Give tenants' registered webhooks their lanes (new ones start, removed ones end
        once their queue is sent)."""
        wanted = {destination.id for destination, _ in registered}
        for lane_id in self._registered - wanted:
            lane = self.lanes.pop(lane_id)
            lane.send.close()
        for destination, secret in registered:
            if destination.id in self.lanes:
                continue
            lane = self.lanes[destination.id] = _Lane(destination, self.settings.queue_size, secret)
            if self._group is not None:
                self._group.start_soon(self._work, lane)
        self._registered = wanted

    async def submit(self, message: Message) -> None:
        """Queue ``message`` for every destination that may receive it."""
        for lane in list(self.lanes.values()):
            if not may_receive(lane.destination, message):
                continue
            try:
                lane.send.send_nowait(message)
            except anyio.WouldBlock:
                await self._note(message, lane.destination, "dropped", 0, "queue full")

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            for lane in self.lanes.values():
                group.start_soon(self._work, lane)
            await anyio.sleep_forever()

    async def _work(self, lane: _Lane) -> None:
        async with lane.receive:
            async for message in lane.receive:
                await lane.bucket.take()
                await self._deliver(lane, message)

    async def _deliver(self, lane: _Lane, message: Message) -> None:
        destination = lane.destination
        body = render(message, destination.format)
        settings = self.settings
        detail = ""
        for attempt in range(1, settings.max_attempts + 1):
            final, detail = await self._send(lane, message, body)
            if final and not detail:
                await self._note(message, destination, "delivered", attempt, "")
                return
            if final or attempt == settings.max_attempts:
                break
            ceiling = min(settings.retry_max_s, settings.retry_base_s * 2 ** (attempt - 1))
            await anyio.sleep(self.rng.uniform(0, ceiling))
        log.warning(
            "alert delivery failed",
            destination=destination.id,
            rule=message.alert.rule,
            detail=detail,
        )
        await self._note(message, destination, "failed", attempt, detail)

    async def _send(self, lane: _Lane, message: Message, body: bytes) -> tuple[bool, str]:
        """``(final, error)``: ``(True, "")`` delivered; ``final`` errors are not retried."""
        destination = lane.destination
        headers = {
            "content-type": "application/json",
            "user-agent": "tenantware-alerts",
            "tenantware-event-id": message.id,
        }
        secret = lane.secret if lane.secret is not None else destination.secret()
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, body, int(time.time()))
        try:
            response = await self.client.post(
                destination.url, content=body, headers=headers, timeout=destination.timeout_s
            )
        except httpx.HTTPError as exc:
            return False, type(exc).__name__
        status = response.status_code
        if 200 <= status < 300:
            return True, ""
        return (400 <= status < 500 and status not in _RETRIED_4XX), f"HTTP {status}"

    async def _note(
        self,
        message: Message,
        destination: AlertDestination,
        event: EventKind,
        attempts: int,
        detail: str,
    ) -> None:
        await self.record(
            AlertEvent(
                id=secrets.token_hex(8),
                ts=time.time(),
                event=event,
                fingerprint=message.alert.fingerprint,
                rule=message.alert.rule,
                tenant=message.alert.tenant,
                status=message.status,
                value=message.alert.value,
                destination=destination.id,
                attempts=attempts,
                detail=detail,
            )
        )

    async def aclose(self) -> None:
        for lane in self.lanes.values():
            await lane.send.aclose()
            await lane.receive.aclose()
