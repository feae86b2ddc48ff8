"""What the quota layer does when the shared store is slow or down.

A primary that bounds its own calls (the Redis stores: an outage is declared from evidence,
``backends/multiplex.py``) is called as is; any other is bounded by ``timeout_s``. When a
call fails, each plan's own policy answers (``backends/failover.py``):
``closed`` limits refuse the request, ``local`` limits are kept by an in-memory limiter with
the limit divided among the replicas, ``open`` limits are not checked.

A reservation given up on (the store failed or the caller was cancelled) may still have been
run by Redis, or be run when it resumes (before its deadline, ``backends/redis_clock.py``):
its concurrency slot is released once the store answers again, so no slot stays taken for
a request that is gone. Only the slot is released (idempotent: a ticket never granted
changes nothing); a late reservation's tokens and cost stay charged, the safe side. So is
the slot of a request that ended while the store was down (its settle could not be sent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager

import anyio

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.failover import Failover, StoreHealth
from tenantware.backends.redis_clock import GivenUp
from tenantware.config import FailurePolicy
from tenantware.quota.memory import MemoryQuotaStore
from tenantware.quota.plan import Plan
from tenantware.quota.store import Decision, QuotaStore

__all__ = ["FailoverQuotaStore"]

_NO_DEADLINE = contextlib.nullcontext()


def _policy(plan: Plan) -> FailurePolicy:
    """The policy a plan falls back to as a whole: closed beats local beats open."""
    return "closed" if plan.closed else "local" if plan.local is not None else "open"


class FailoverQuotaStore:
    """Wraps a shared store (Redis) with a deadline and the per-limit failure policies."""

    remote = True
    bounded = True
    yields = True

    def __init__(
        self,
        primary: QuotaStore,
        *,
        timeout_s: float = 0.05,
        probe_interval_s: float = 0.25,
        fallback: MemoryQuotaStore | None = None,
        health: StoreHealth | None = None,
    ) -> None:
        self.primary = primary
        self.prefix = primary.prefix
        self.single_node = primary.single_node
        self.timeout_s = timeout_s
        self.fallback = fallback or MemoryQuotaStore(prefix=primary.prefix)
        self.failover = Failover(
            "quota", health, probe_interval_s=probe_interval_s, bound_s=timeout_s
        )
        #: The primary bounds its own calls (``MultiplexedRedis``): no cancel scope per call.
        self._bounded = primary.bounded
        #: Reservations with a slot whose caller gave up: released when the store answers.
        self._given_up: GivenUp[tuple[Plan, str]] = GivenUp()

    def _deadline(self) -> AbstractContextManager[object]:
        """``timeout_s`` around a primary call, unless the primary bounds its calls itself."""
        return _NO_DEADLINE if self._bounded else anyio.fail_after(self.timeout_s)

    @property
    def available(self) -> bool:
        """``False`` while the store is considered down (after a failure, for a while)."""
        return self.failover.available

    def _failed(self, exc: BaseException, call: str, plan: Plan) -> None:
        self.failover.failed(
            exc,
            call,
            policy=_policy(plan),
            policies=sorted({limit.group + "=" + limit.policy for limit in plan.limits}),
        )

    async def reserve(
        self, plan: Plan, tokens: int, cost: int, ticket: str, *, charge: int | None = None
    ) -> Decision:
        primary = self.primary

        def call() -> Awaitable[Decision]:
            return primary.reserve(plan, tokens, cost, ticket, charge=charge)

        return await self.reserve_by(plan, tokens, cost, ticket, call)

    async def reserve_by(
        self,
        plan: Plan,
        tokens: int,
        cost: int,
        ticket: str,
        call: Callable[[], Awaitable[Decision]],
    ) -> Decision:
        """``reserve`` with the primary's reservation made by ``call`` (a script that also
        decides something else: ``tenantware.joint``), under the same failure policies."""
        failover = self.failover
        if failover.available:
            try:
                with self._deadline():
                    decision = await call()
            except STORE_UNAVAILABLE as exc:
                self._gave_up(plan, ticket)
                self._failed(exc, "reserve", plan)
            except anyio.get_cancelled_exc_class():
                self._gave_up(plan, ticket)
                raise
            else:
                if failover.down:
                    failover.succeeded()
                if self._given_up:
                    await self._release_given_up()
                return decision
        return self._degraded(plan, tokens, cost, ticket)

    def _gave_up(self, plan: Plan, ticket: str) -> None:
        if plan.holds_slots:
            self._given_up.add((plan, ticket))

    async def _release_given_up(self) -> None:
        """Free the slots of reservations given up on (the store answers again)."""

        async def release(plan: Plan, ticket: str) -> None:
            try:
                with self._deadline():
                    await self.primary.settle(plan, 0, ticket, 0, 0)
            except STORE_UNAVAILABLE:
                self._given_up.add((plan, ticket))  # next time the store answers

        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for plan, ticket in self._given_up.take():
                    group.start_soon(release, plan, ticket)

    def _degraded(self, plan: Plan, tokens: int, cost: int, ticket: str) -> Decision:
        policy = _policy(plan)
        self.failover.degraded(policy)
        if policy == "closed":
            return Decision(False, -1, 1_000_000, 0, [], [], source="closed")
        if plan.local is not None:
            decision = self.fallback.reserve_now(plan.local, tokens, cost, ticket)
            decision.source = "local"
            return decision
        return Decision(True, -1, 0, 0, [], [], source="open")

    async def settle(
        self,
        plan: Plan,
        now_us: int,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        *,
        cancel: bool = False,
        local: bool = False,
        charge_delta: int | None = None,
    ) -> None:
        if local:
            if plan.local is not None:
                self.fallback.settle_now(plan.local, now_us, ticket, tokens_delta, cost_delta)
            return
        primary = self.primary

        def call() -> Awaitable[None]:
            return primary.settle(
                plan,
                now_us,
                ticket,
                tokens_delta,
                cost_delta,
                cancel=cancel,
                charge_delta=charge_delta,
            )

        await self.settle_by(plan, ticket, call)

    async def settle_by(self, plan: Plan, ticket: str, call: Callable[[], Awaitable[None]]) -> None:
        """``settle`` of a reservation the store granted, made by ``call`` (a script that
        also does something else: ``tenantware.joint``), under the same failure rules: not
        made while the store is down, and a failed one is not sent again (the reservation
        stays charged, the safe side; its slot is freed once the store answers)."""
        failover = self.failover
        if failover.down:
            # The reservation stays charged (the safe side); its slot is freed once the
            # store answers again, or by its lease (no longer renewed).
            self.primary.forget(plan, ticket)
            self._gave_up(plan, ticket)
            failover.degraded(_policy(plan))
            return
        try:
            with self._deadline():
                await call()
        except STORE_UNAVAILABLE as exc:
            self._gave_up(plan, ticket)
            self._failed(exc, "settle", plan)
            failover.degraded(_policy(plan))

    async def renew(self) -> int:
        """Renew the local limiter's slots and the shared store's. During an outage the
        shared ones are renewed when a probe may go (a slot whose lease runs out first is
        freed: its request goes on uncounted, never blocked)."""
        renewed = self.fallback.renew_now()
        failover = self.failover
        if not failover.available:
            return renewed
        try:
            with self._deadline():
                renewed += await self.primary.renew()
        except STORE_UNAVAILABLE as exc:
            failover.failed(exc, "renew")
        return renewed

    def forget(self, plan: Plan, ticket: str) -> None:
        self.primary.forget(plan, ticket)

    async def usage(self, plan: Plan) -> list[int]:
        with anyio.fail_after(self.timeout_s):
            return await self.primary.usage(plan)

    # A balance is money: its calls have no fallback; an outage raises ``StoreUnavailable``.

    async def credit(self, tenant_id: str, entry_id: str, amount: int, low_nanousd: int) -> int:
        with anyio.fail_after(self.timeout_s * 20):
            return await self.primary.credit(tenant_id, entry_id, amount, low_nanousd)

    async def balance(self, tenant_id: str) -> int | None:
        with anyio.fail_after(self.timeout_s * 20):
            return await self.primary.balance(tenant_id)

    async def restore(self, tenant_id: str, balance: int, credited: list[str]) -> bool:
        with anyio.fail_after(self.timeout_s * 20):
            return await self.primary.restore(tenant_id, balance, credited)
