"""The joint reservation and seat request as one Lua script on a single Redis server.

The script is composed when this module is loaded from the quota layer's reservation
(``quota.redis.lua_source("reserve")``) and the admission layer's pool script
(``admission.redis.lua_source()``), each body wrapped as a local function of ``(KEYS, ARGV)``,
followed by ``lua/joint.lua``, which splits the keys and arguments and runs the second only
when the first granted. Each script stays its layer's own, and so do the layout of its
arguments (``RedisQuotaStore.reserve_args``, ``RedisSeatStore.acquire_args``) and the reading
of its reply (``reserved``, ``acquired``).

Failures: the quota failure policy answers for the reservation as for a reservation alone
(``FailoverQuotaStore.reserve_by``); no seat status is returned then, and the admission
layer's own ``acquire`` applies the admission failure policy (during an outage, without a
call). A seat request whose call was given up on is released once Redis answers again, as an
acquire's is. The deadline is the reservation's, in Redis time: run later, the script writes
nothing for either half (the seat request, run in the same script, needs none of its own).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import anyio

from tenantware.admission.core import Ticket
from tenantware.admission.redis import RedisSeatStore
from tenantware.admission.redis import lua_source as admission_source
from tenantware.admission.store import SeatStore
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.redis_support import register_script
from tenantware.quota.failover import FailoverQuotaStore
from tenantware.quota.plan import Plan
from tenantware.quota.redis import RedisQuotaStore
from tenantware.quota.redis import lua_source as quota_source
from tenantware.quota.store import Decision

__all__ = ["RedisReserveAcquire", "compose"]


def compose(reserve: str, acquire: str) -> str:
    """The joint script: ``reserve`` and ``acquire`` (whole scripts of ``KEYS`` and ``ARGV``)
    as local functions, then the dispatcher."""
    dispatch = (files("tenantware.joint") / "lua" / "joint.lua").read_text()
    return (
        f"local function quota_reserve(KEYS, ARGV)\n{reserve}\nend\n"
        f"local function admission(KEYS, ARGV)\n{acquire}\nend\n{dispatch}"
    )


_SCRIPT = compose(quota_source("reserve"), admission_source())


class RedisReserveAcquire:
    """``RedisReserveAcquire(quota, primary)``: the quota store with its failure policies and
    the Redis store inside it; seat pools on the same connection are ``add``-ed."""

    def __init__(self, quota: FailoverQuotaStore, primary: RedisQuotaStore) -> None:
        self.quota = quota
        self.primary = primary
        self._script: Any = register_script(primary.client, _SCRIPT)
        #: The seat stores one call reaches (by identity).
        self._pools: dict[object, RedisSeatStore] = {}

    def add(self, pool: RedisSeatStore) -> None:
        """A seat pool whose script runs on the quota store's connection."""
        self._pools[pool] = pool

    def serves(self, seats: SeatStore) -> bool:
        return seats in self._pools

    async def reserve_acquire(
        self,
        plan: Plan,
        tokens: int,
        cost: int,
        ticket: str,
        charge: int | None,
        seats: SeatStore,
        seat_ticket: Ticket,
    ) -> tuple[Decision, int | None]:
        pool = self._pools[seats]
        primary = self.primary
        acquired: list[Any] = []

        async def call() -> Decision:
            now, arg = primary.reserve_args(plan, tokens, cost, ticket, charge)
            try:
                reply = await self._script(
                    keys=[*plan.keys, *pool.keys],
                    args=[arg, *pool.acquire_args(seat_ticket, 0)],
                )
            except (*STORE_UNAVAILABLE, anyio.get_cancelled_exc_class()):
                pool.given_up(seat_ticket)  # Redis may run it yet, before its deadline
                raise
            decision = primary.reserved(plan, ticket, now, reply[0])
            if len(reply) > 1:
                acquired.append(reply[1])
            return decision

        decision = await self.quota.reserve_by(plan, tokens, cost, ticket, call)
        if not acquired:
            return decision, None
        return decision, await pool.acquired(seat_ticket, acquired[0])
