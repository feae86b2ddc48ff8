"""The shared seat store: counters, queues and seats of a pool in Redis, for many processes.

Every decision is one call of ``lua/admission.lua`` (the rules of ``FairCore``), so fairness
holds across all gateway processes sharing the Redis. Seats are leases: this process renews
the leases it holds (``renew_forever``, run by ``AdmissionPools.running``) and a crashed
process's seats expire after ``lease_s``; a queued ticket whose process stops polling expires
after its heartbeat.

Wake-up: a decision (usually a release) grants the next tickets inside Redis and returns their
ids. Waiters of this process are woken at once through their event; the ids of other
processes' tickets are published on the pool's channel and each process's listener
(``run_forever``) wakes its own. Waiters also poll with exponential backoff (``poll_min_s``
doubling up to ``poll_max_s``), so a lost notice costs at most ``poll_max_s`` of seat idle
time, and a queued ticket's poll is its heartbeat.

Failure policy (``backends/failover.py``) when Redis cannot decide an ``acquire``: ``open``
admits the request unaccounted, ``closed`` answers ``UNAVAILABLE`` (the middleware's 503),
``local`` queues it in a pool kept by this process with its share of the seats
(``seats // replicas``) until Redis answers again.

An ``acquire`` given up on (Redis failed, or the caller was cancelled) leaves nothing behind:
it carries a deadline in Redis time and the script refuses it when run later
(``backends/redis_clock.py``); one run before its deadline is undone by a release of its
ticket once Redis answers again (a release of a ticket never granted changes nothing). So
is the release of a request that ended while Redis was down.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio

from tenantware.admission.core import GRANTED, LINGER_S, QUEUED, Ticket
from tenantware.admission.memory import MemorySeatStore
from tenantware.admission.store import UNAVAILABLE, PoolSpec
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.failover import Failover
from tenantware.backends.keys import tenant_key
from tenantware.backends.lua_args import pack_values
from tenantware.backends.multiplex import RedisTimeoutError
from tenantware.backends.redis_clock import GivenUp, RedisClock, budget_of
from tenantware.backends.redis_support import (
    RedisClient,
    ScriptHost,
    redis_errors,
    register_script,
)
from tenantware.config import FailurePolicy

__all__ = ["RedisSeatStore"]

_BODY = resources.files("tenantware.admission").joinpath("lua/admission.lua").read_text()
#: Alone, the script reads Redis time itself (``now_ms``: none handed over).
_SCRIPT = "local now_ms\n" + _BODY


def lua_source() -> str:
    """The pool's script (every decision of ``lua/admission.lua``) as the body of a function
    with ``KEYS``, ``ARGV`` and ``now_ms`` (Redis time in ms, or ``nil``: TIME) in scope."""
    return _BODY


#: ``Ticket.lease`` of a ticket admitted unchecked (``open``) or by the local pool (``local``).
_UNACCOUNTED = "-"
_LOCAL = "~"
#: ``acquire``'s status when Redis ran it after its deadline (nothing was done).
_EXPIRED = 4


async def _done() -> None:
    """Nothing to wait for."""


class RedisSeatStore:
    """One seat pool in Redis; see the module docstring for leases, wake-up and failures."""

    remote = True
    yields = True

    def __init__(
        self,
        redis: RedisClient,
        *,
        pool: str = "*",
        seats: int,
        prefix: str = "",
        band_shares: Sequence[float] = (16.0, 4.0, 1.0),
        max_queue: int = 256,
        tokens_per_s: float | None = None,
        burst_s: float = 1.0,
        lease_s: float = 30.0,
        poll_min_s: float = 0.002,
        poll_max_s: float = 0.25,
        on_failure: FailurePolicy = "open",
        heartbeat_s: float | None = None,
        scripts: ScriptHost | None = None,
        replicas: int = 1,
        failover: Failover | None = None,
        headroom: int = 0,
        short_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.seats = seats
        self.replicas = replicas
        self._band_shares = band_shares
        self._tokens_per_s = tokens_per_s
        self._burst_s = burst_s
        self._headroom = headroom
        self._short_s = short_s
        self._keys = [tenant_key(prefix, f"adm:{pool}")]
        self._channel = self._keys[0] + ":wake"
        self._head = self._terms(seats)
        #: Decisions run on ``scripts`` when given (the pipelined connection); pub/sub on redis.
        self._script: Any = register_script(scripts or redis, _SCRIPT)
        self.max_queue = max_queue
        self.lease_ms = int(lease_s * 1000)
        #: A queued ticket whose process has not polled for this long is dropped.
        self.heartbeat_ms = int((heartbeat_s or max(2.0, 20 * poll_max_s)) * 1000)
        self.lease_s = lease_s
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.on_failure = on_failure
        self.failover = failover or Failover("admission")
        #: The pool this process keeps while Redis is down (``local`` policy), made on need.
        self._local: MemorySeatStore | None = None
        #: Tickets of this process: queued (woken by local releases) and holding a lease.
        self._waiting: dict[str, Ticket] = {}
        self._held: set[str] = set()
        self._prefix = os.urandom(6).hex() + ":"
        self._seq = 0
        #: Redis time as last seen (ms), for the deadline of each ``acquire``.
        self.redis_clock = RedisClock(1000)
        self.budget_s = budget_of(scripts or redis)
        #: Release arguments of acquires given up on and of releases Redis could not take:
        #: sent once Redis answers again.
        self._given_up: GivenUp[tuple[Any, ...]] = GivenUp()

    @classmethod
    def from_spec(
        cls,
        spec: PoolSpec,
        redis: RedisClient,
        *,
        prefix: str = "",
        scripts: ScriptHost | None = None,
        on_failure: FailurePolicy = "open",
        replicas: int = 1,
        failover: Failover | None = None,
    ) -> RedisSeatStore:
        """The shared pool of ``spec``."""
        return cls(
            redis,
            pool=spec.name,
            seats=spec.seats,
            prefix=prefix,
            band_shares=spec.band_shares,
            max_queue=spec.max_queue,
            tokens_per_s=spec.tokens_per_s,
            burst_s=spec.burst_s,
            lease_s=spec.lease_s,
            poll_min_s=spec.poll_min_s,
            poll_max_s=spec.poll_max_s,
            headroom=spec.headroom,
            short_s=spec.short_s,
            on_failure=on_failure,
            scripts=scripts,
            replicas=replicas,
            failover=failover,
        )

    def _terms(self, seats: int) -> bytes:
        """The pool's terms as every call of the script takes them (packed once)."""
        rate = float(self._tokens_per_s or 0.0)
        steps = [1 / float(share) for share in self._band_shares]
        return pack_values(
            seats,
            rate,
            rate * self._burst_s,
            steps,
            self._headroom,
            float(self._short_s),
            float(LINGER_S),
        )

    def _local_pool(self) -> MemorySeatStore:
        """This process's share of the pool, for the ``local`` policy."""
        if self._local is None:
            self._local = MemorySeatStore(
                max(1, self.seats // self.replicas),
                band_shares=self._band_shares,
                max_queue=self.max_queue,
                tokens_per_s=self._tokens_per_s,
                burst_s=self._burst_s,
                headroom=self._headroom,
                short_s=self._short_s,
            )
        return self._local

    def _failed(self, exc: BaseException, call: str) -> None:
        """A call other than ``acquire`` failed: counted; the policy has nothing to decide."""
        self.failover.failed(exc, call, policy=self.on_failure)
        self.failover.degraded(self.on_failure)

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._script(keys=self._keys, args=[op, self._head, pack_values(*args)])

    def _wake(self, granted: Sequence[Any]) -> list[bytes]:
        """Wake this process's waiters among ``granted``; the other processes' ticket ids."""
        others: list[bytes] = []
        for raw in granted:
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            ticket = self._waiting.get(key)
            if ticket is not None:
                ticket.granted = True
                self._held.add(ticket.id)
                ticket.handle.set()
            elif not key.startswith(self._prefix):
                others.append(key.encode())
        return others

    async def _granted(self, granted: Sequence[Any]) -> None:
        """After a decision: wake local waiters at once, tell other processes by pub/sub."""
        if not granted:
            return
        others = self._wake(granted)
        if others:
            try:
                with redis_errors():
                    await self.redis.publish(self._channel, b" ".join(others))
            except STORE_UNAVAILABLE as exc:
                self._failed(exc, "publish")  # their owners find the grant by polling

    async def acquire(self, ticket: Ticket) -> int:
        failover = self.failover
        if not failover.available:
            self._name(ticket)
            return await self._degraded(ticket)
        try:
            reply = await self._script(
                keys=self._keys,
                args=self.acquire_args(ticket, self.redis_clock.deadline(self.budget_s)),
            )
            if int(reply[0]) == _EXPIRED:
                raise RedisTimeoutError("Redis ran the seat request after its deadline")
        except STORE_UNAVAILABLE as exc:
            self.given_up(ticket)
            failover.failed(exc, "acquire", policy=self.on_failure)
            return await self._degraded(ticket)
        except anyio.get_cancelled_exc_class():
            self.given_up(ticket)
            raise
        return await self.acquired(ticket, reply)

    @property
    def keys(self) -> list[str]:
        """``KEYS`` of every call of this pool's script."""
        return self._keys

    def acquire_args(self, ticket: Ticket, deadline_ms: int) -> list[Any]:
        """``ARGV`` of an ``acquire`` of ``ticket`` (which gets a new id here) that Redis runs
        only until ``deadline_ms`` in its time (0: no deadline); ``acquired`` reads the reply.
        Apart so that another script can run the acquire (``tenantware.joint``)."""
        self._name(ticket)
        return [
            "acquire",
            self._head,
            pack_values(
                ticket.id,
                ticket.tenant,
                ticket.band + 1,
                float(ticket.cost),
                float(ticket.weight),
                ticket.reserved,
                ticket.cap,
                self.max_queue,
                self.lease_ms,
                self.heartbeat_ms,
                float(ticket.tokens),
                float(ticket.hold),
                deadline_ms,
            ),
        ]

    def _name(self, ticket: Ticket) -> None:
        """A new id for each acquire of a ticket (a re-queued one is another request)."""
        self._seq += 1
        ticket.id = ticket.lease = f"{self._prefix}{self._seq}"

    async def acquired(self, ticket: Ticket, reply: Any) -> int:
        """The status of an ``acquire`` Redis ran (its reply), with its bookkeeping: the
        ticket held or waiting, other tickets it granted woken, given-up calls released."""
        if self.failover.down:
            self.failover.succeeded()
        self.redis_clock.observe(int(reply[1]))
        if self._given_up:
            await self._release_given_up()
        status = int(reply[0])
        await self._granted(reply[2:])
        if status == GRANTED:
            ticket.granted = True
            self._held.add(ticket.id)
        elif status == QUEUED:
            ticket.handle = anyio.Event()
            self._waiting[ticket.id] = ticket
        return status

    def given_up(self, ticket: Ticket) -> None:
        """Queue the release of an acquire whose outcome this process will never know."""
        self._given_up.add(
            (
                ticket.id,
                ticket.tenant,
                ticket.band + 1,
                float(ticket.cost),
                float(ticket.weight),
                0.0,
                self.lease_ms,
                float(ticket.tokens),
                0.0,
            )
        )

    async def _release_given_up(self) -> None:
        """Release every acquire given up on (Redis answers again): seats and queue places
        taken late go back to the pool."""

        async def release(args: tuple[Any, ...]) -> None:
            try:
                await self._granted(await self._call("release", *args))
            except STORE_UNAVAILABLE:
                self._given_up.add(args)  # next time Redis answers

        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for args in self._given_up.take():
                    group.start_soon(release, args)

    async def _degraded(self, ticket: Ticket) -> int:
        """Redis cannot decide: the failure policy does."""
        policy = self.on_failure
        self.failover.degraded(policy)
        if policy == "closed":
            return UNAVAILABLE
        if policy == "local":
            ticket.lease = _LOCAL
            return await self._local_pool().acquire(ticket)
        ticket.lease = _UNACCOUNTED
        ticket.granted = True
        return GRANTED

    async def wait(self, ticket: Ticket) -> None:
        if ticket.lease == _LOCAL:
            await self._local_pool().wait(ticket)
            return
        delay = self.poll_min_s
        try:
            while not ticket.granted:
                event = ticket.handle
                with anyio.move_on_after(delay):
                    await event.wait()
                if ticket.granted:
                    return
                try:
                    reply = await self._call("poll", ticket.id, self.lease_ms, self.heartbeat_ms)
                except STORE_UNAVAILABLE as exc:
                    # Keep waiting (the caller bounds the wait); the next poll may succeed.
                    self._failed(exc, "poll")
                    delay = self.poll_max_s
                    continue
                await self._granted(reply[1:])
                status = int(reply[0])
                if status == GRANTED:
                    ticket.granted = True
                    self._held.add(ticket.id)
                    return
                if status != QUEUED:
                    # The ticket expired (this process stalled past its heartbeat): re-queue.
                    self._waiting.pop(ticket.id, None)
                    if await self.acquire(ticket) == GRANTED:
                        return
                delay = min(delay * 2, self.poll_max_s)
        finally:
            self._waiting.pop(ticket.id, None)

    async def cancel(self, ticket: Ticket) -> None:
        if ticket.lease == _LOCAL:
            await self._local_pool().cancel(ticket)
            return
        await self.release(ticket, 0.0, 0.0)

    async def release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> None:
        await self.start_release(ticket, actual_cost, actual_tokens)

    def start_release(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> Awaitable[None]:
        self._waiting.pop(ticket.id, None)
        if ticket.lease == _UNACCOUNTED:
            return _done()
        if ticket.lease == _LOCAL:
            return self._local_pool().release(ticket, actual_cost, actual_tokens)
        args = self.release_args(ticket, actual_cost, actual_tokens)
        if self.failover.down:
            # Sent once Redis answers again (the seat stays taken until then).
            self._given_up.add(args)
            self.failover.degraded(self.on_failure)
            return _done()
        return self._released(
            self._script.send(keys=self._keys, args=self.release_argv(args)), args
        )

    def sends_release(self, ticket: Ticket) -> bool:
        """Whether the release of ``ticket`` is a call of the pool's script now (not when
        it was admitted unchecked or by the local pool, nor while Redis is down)."""
        return ticket.lease != _UNACCOUNTED and ticket.lease != _LOCAL and not self.failover.down

    def release_args(
        self, ticket: Ticket, actual_cost: float, actual_tokens: float | None = None
    ) -> tuple[Any, ...]:
        """The values of the release of ``ticket``, which this process no longer holds from
        here on; ``release_argv`` makes the call's ``ARGV`` of them and ``released`` reads
        its answer. Apart so that another script can run the release (``tenantware.joint``)."""
        self._waiting.pop(ticket.id, None)
        self._held.discard(ticket.id)
        ticket.granted = False
        return (
            ticket.id,
            ticket.tenant,
            ticket.band + 1,
            float(ticket.cost),
            float(ticket.weight),
            float(actual_cost),
            self.lease_ms,
            float(ticket.tokens),
            float(ticket.tokens if actual_tokens is None else actual_tokens),
        )

    def release_argv(self, args: tuple[Any, ...]) -> list[Any]:
        """``ARGV`` of a release of ``args`` (``release_args``)."""
        return ["release", self._head, pack_values(*args)]

    async def _released(self, reply: Awaitable[Any], args: tuple[Any, ...]) -> None:
        try:
            granted = await reply
        except STORE_UNAVAILABLE as exc:
            self.release_failed(args, exc)
            return
        await self.released(granted)

    def release_failed(self, args: tuple[Any, ...], exc: BaseException) -> None:
        """A release Redis could not take: sent again once Redis answers (a release of a
        ticket already released changes nothing)."""
        self._given_up.add(args)
        self._failed(exc, "release")

    async def released(self, granted: Sequence[Any]) -> None:
        """After a release Redis ran (its answer: the tickets it granted): their owners
        are woken."""
        await self._granted(granted)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """``run_forever`` in the background while the gateway runs."""
        async with anyio.create_task_group() as group:
            group.start_soon(self.run_forever)
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    async def charge(self, ticket: Ticket, extra_cost: float) -> None:
        if ticket.lease == _UNACCOUNTED or not ticket.granted or extra_cost <= 0:
            return
        if ticket.lease == _LOCAL:
            await self._local_pool().charge(ticket, extra_cost)
            return
        if self.failover.down:
            return  # the release still corrects from the estimate
        ticket.cost += extra_cost  # the release corrects from the charge so far
        try:
            await self._call(
                "charge", ticket.id, ticket.tenant, float(ticket.weight), float(extra_cost)
            )
        except STORE_UNAVAILABLE as exc:
            # Only this early correction is lost; the release still corrects from the estimate.
            ticket.cost -= extra_cost
            self._failed(exc, "charge")

    async def run_forever(self) -> None:
        """This process's share of the pool's upkeep: lease renewal and grant notices."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._renew_forever)
            await self._listen_forever()

    async def _renew_forever(self) -> None:
        """Push the expiry of this process's leases every third of ``lease_s``."""
        while True:
            await anyio.sleep(self.lease_s / 3)
            if self._held:
                try:
                    await self._script(
                        keys=self._keys,
                        args=["renew", self._head, pack_values(self.lease_ms), *self._held],
                    )
                except STORE_UNAVAILABLE as exc:
                    self._failed(exc, "renew")

    async def _listen_forever(self) -> None:
        """Wake local waiters granted by another process (polling remains the fallback)."""
        while True:
            try:
                with redis_errors():
                    # A cluster client learns its slot map here, not in ``pubsub()``, which
                    # fails on an empty map when no call has been made yet.
                    await self.redis.initialize()
                    pubsub = self.redis.pubsub()
                    try:
                        await pubsub.subscribe(self._channel)
                        while True:
                            message = await pubsub.get_message(
                                ignore_subscribe_messages=True, timeout=1.0
                            )
                            if message is not None and isinstance(message["data"], bytes):
                                self._wake(message["data"].split())
                    finally:
                        with anyio.CancelScope(shield=True):
                            await pubsub.aclose()  # type: ignore[no-untyped-call]
            except STORE_UNAVAILABLE as exc:
                self._failed(exc, "subscribe")
                await anyio.sleep(1.0)

    def resize(self, seats: int) -> None:
        # Every call passes the seat count; the next decision (or waiter's poll) applies it.
        self.seats = seats
        self._head = self._terms(seats)
        if self._local is not None:
            self._local.resize(max(1, seats // self.replicas))

    async def state(self) -> dict[str, Any]:
        reply = await self._call("state")
        tenants: dict[str, dict[str, float]] = {}
        for i in range(2, len(reply), 5):
            name = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
            tenants[name] = {
                "counter": float(reply[i + 1]),
                "held": int(reply[i + 2]),
                "queued": int(reply[i + 3]),
                "oldest_wait_s": int(reply[i + 4]) / 1000,
            }
        return {
            "seats": self.seats,
            "in_use": int(reply[0]),
            "waiting": int(reply[1]),
            "tenants": tenants,
        }
