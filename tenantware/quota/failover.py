"""What the quota layer does when the shared store is slow or down.

Every call to the primary store is bounded by ``timeout_s`` (default 50 ms). When it fails,
each plan's own policy answers: ``closed`` limits refuse the request, ``local`` limits are kept
by an in-memory limiter with the limit divided among the replicas, ``open`` limits are not
checked. After a failure the store is left alone for ``retry_after_s`` so an outage costs
requests nothing; then the next call tries it again. Backend errors are translated here only.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager

import anyio
import structlog
from redis.exceptions import RedisError

from tenantware import metrics
from tenantware.quota.memory import MemoryQuotaStore
from tenantware.quota.plan import Plan
from tenantware.quota.store import Decision, QuotaStore

__all__ = ["FailoverQuotaStore"]

log = structlog.get_logger("tenantware.quota")

_FAILURES = (RedisError, OSError, TimeoutError)
_NO_DEADLINE = contextlib.nullcontext()


def _policy(plan: Plan) -> str:
    """The policy a plan falls back to as a whole: closed beats local beats open."""
    return "closed" if plan.closed else "local" if plan.local is not None else "open"


class FailoverQuotaStore:
    """Wraps a shared store (Redis) with a timeout and the per-limit failure policies."""

    def __init__(
        self,
        primary: QuotaStore,
        *,
        timeout_s: float = 0.05,
        retry_after_s: float = 1.0,
        fallback: MemoryQuotaStore | None = None,
    ) -> None:
        self.primary = primary
        self.prefix = primary.prefix
        self.single_node = primary.single_node
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.fallback = fallback or MemoryQuotaStore(prefix=primary.prefix)
        self._down_until = 0.0
        self._down = False
        #: The primary bounds its own calls (``MultiplexedRedis``): no cancel scope per call.
        self._bounded = bool(getattr(primary, "bounded", False))
        self._counters = {
            policy: metrics.STORE_FAILURES.labels("quota", policy)
            for policy in ("open", "closed", "local")
        }

    def _deadline(self) -> AbstractContextManager[object]:
        """``timeout_s`` around a primary call, unless the primary bounds its calls itself."""
        return _NO_DEADLINE if self._bounded else anyio.fail_after(self.timeout_s)

    @property
    def available(self) -> bool:
        """``False`` while the store is considered down (after a failure, for a while)."""
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, what: str, plan: Plan) -> None:
        was_up = not self._down
        self._down_until = time.monotonic() + self.retry_after_s
        self._down = True
        if was_up:  # once per outage, not once per request
            log.warning(
                "quota store unavailable; failure policies in force",
                call=what,
                error=type(exc).__name__,
                policy=_policy(plan),
                policies=sorted({limit.group + "=" + limit.policy for limit in plan.limits}),
                retry_in_s=self.retry_after_s,
            )

    async def reserve(self, plan: Plan, tokens: int, cost: int, ticket: str) -> Decision:
        if self.available:
            try:
                with self._deadline():
                    decision = await self.primary.reserve(plan, tokens, cost, ticket)
            except _FAILURES as exc:
                self._failed(exc, "reserve", plan)
            else:
                if self._down:
                    self._down = False
                    log.info("quota store available again")
                return decision
        return self._degraded(plan, tokens, cost, ticket)

    def _degraded(self, plan: Plan, tokens: int, cost: int, ticket: str) -> Decision:
        policy = _policy(plan)
        self._counters[policy].inc()
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
    ) -> None:
        try:
            with self._deadline():
                await self.primary.settle(
                    plan, now_us, ticket, tokens_delta, cost_delta, cancel=cancel
                )
        except _FAILURES as exc:
            # The reservation stays charged (the safe side); its slot frees with its lease.
            self._failed(exc, "settle", plan)
            self._counters[_policy(plan)].inc()

    def settle_local(
        self, plan: Plan, now_us: int, ticket: str, tokens_delta: int, cost_delta: int
    ) -> None:
        """Settle a reservation the local fallback limiter granted."""
        if plan.local is not None:
            self.fallback.settle_now(plan.local, now_us, ticket, tokens_delta, cost_delta)

    async def usage(self, plan: Plan) -> list[int]:
        with anyio.fail_after(self.timeout_s):
            return await self.primary.usage(plan)
