"""The quota store protocol: reserve all limits of a plan at once, settle later.

A store answers one ``reserve`` with a ``Decision`` (all limits granted, or none changed) and
applies one ``settle`` (the difference between reserved and actual, the concurrency slot
back). Time is the store's own (Redis ``TIME``), so replicas with skewed clocks agree.

A concurrency slot is a lease (``quota.lease_s``): it expires unless the process holding it
renews it, so the slot of a process that crashed, or of a request whose settle never reached
the store, comes back after one lease. ``renew`` (run every third of the lease by
``quota.renewal.renewing``, a gateway service) keeps the slots of long requests.
"""

from __future__ import annotations

from typing import Protocol

from tenantware.context import DecisionSource
from tenantware.quota.plan import Plan

__all__ = ["Decision", "QuotaStore"]


class Decision:
    """The answer to one reservation.

    ``failed`` is the index of the limit that refused (a budget first, when one did),
    ``retry_after_us`` how long until every refusing rate limit would grant (exact), and
    ``remaining``/``reset_us`` per limit feed the ``x-ratelimit-*`` headers. ``now_us`` is the
    store's time of the reservation: settling uses it to find the window that was charged.
    For a prepaid balance, ``remaining`` is the balance left after the reservation and
    ``reset_us`` is 1 when this reservation took it below its low-balance threshold for the
    first time since its last credit (the one request that logs the crossing).
    """

    __slots__ = ("allowed", "failed", "now_us", "remaining", "reset_us", "retry_after_us", "source")

    def __init__(
        self,
        allowed: bool,
        failed: int,
        retry_after_us: int,
        now_us: int,
        remaining: list[int],
        reset_us: list[int],
        source: DecisionSource = "store",
    ) -> None:
        self.allowed = allowed
        self.failed = failed
        self.retry_after_us = retry_after_us
        self.now_us = now_us
        self.remaining = remaining
        self.reset_us = reset_us
        #: ``store``, ``local`` (the fallback limiter decided), ``open`` (nothing checked) or
        #: ``closed`` (refused unchecked).
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, failed={self.failed}, "
            f"retry_after_us={self.retry_after_us}, source={self.source!r})"
        )


class QuotaStore(Protocol):
    """Where quota state lives: ``MemoryQuotaStore`` (one process), ``RedisQuotaStore``, or
    ``FailoverQuotaStore`` (a shared store with the failure policies around it)."""

    #: Prefix of every key (lets several gateways or tests share one Redis).
    prefix: str
    #: One script reaches every key (memory, a single Redis server; not a cluster), so the
    #: tenant's and the global limits can be decided in one call.
    single_node: bool
    #: State lives outside this process (shared by replicas): a failure policy applies.
    remote: bool
    #: Every call bounds its own time (callers need no deadline of their own).
    bounded: bool
    #: ``settle`` awaits I/O, so it must be shielded from cancellation; a store that never
    #: yields spares the request a cancel scope.
    yields: bool

    async def reserve(
        self, plan: Plan, tokens: int, cost: int, ticket: str, *, charge: int | None = None
    ) -> Decision:
        """Grant every limit of ``plan`` for one request of ``tokens`` and ``cost``, or none.

        ``charge`` is what a prepaid balance pays (``cost`` with the tenant's markup; default
        ``cost``)."""
        ...

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
        """Correct the reservation made at ``now_us`` by the deltas and free its slot.

        ``cancel`` also gives back the request itself (used when another scope refused);
        ``local``: the reservation was granted by the failure policy's local limiter
        (``Decision.source == "local"``), not by this store's shared state.
        ``charge_delta`` corrects a prepaid balance (default ``cost_delta``).
        """
        ...

    async def renew(self) -> int:
        """Push the expiry of every slot this process holds (granted, not yet settled) to a
        full lease from now, in the store's time; a slot already expired is not brought back.
        Answers how many were renewed."""
        ...

    def forget(self, plan: Plan, ticket: str) -> None:
        """Stop renewing the slot of a request that ended without a settle reaching the
        store (it was down): the slot expires after its lease unless a release comes first."""
        ...

    async def usage(self, plan: Plan) -> list[int]:
        """Per limit, what is used now: requests' worth of GCRA debt, tokens, nano-USD, slots
        (for a prepaid balance: the balance)."""
        ...

    async def credit(self, tenant_id: str, entry_id: str, amount: int, low_nanousd: int) -> int:
        """Add ``amount`` to a tenant's prepaid balance once per journal ``entry_id`` (a
        credit retried from any replica applies once); the balance after. A balance back at
        ``low_nanousd`` or above may warn again when it next falls below."""
        ...

    async def balance(self, tenant_id: str) -> int | None:
        """A tenant's prepaid balance in nano-USD (``None``: never credited nor restored).
        Reservations in flight are already taken out of it."""
        ...

    async def restore(self, tenant_id: str, balance: int, credited: list[str]) -> bool:
        """Set a balance that the store does not hold (a new process, a flushed Redis) from
        the journal: its sum and the credit entries it contains; ``False`` if one is held."""
        ...
