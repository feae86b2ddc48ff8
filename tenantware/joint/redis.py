"""The joint calls of the quota and admission layers as Lua scripts on a single Redis server.

Two scripts, each composed when this module is loaded from the layers' own scripts, each body
wrapped as a local function of ``(KEYS, ARGV)`` and followed by a dispatcher that splits the
keys and arguments:

- before the upstream, the quota layer's reservation (``quota.redis.lua_source("reserve")``)
  and the admission layer's pool script (``admission.redis.lua_source()``) asking for a seat,
  the second run only when the first granted (``lua/joint.lua``);
- after the response, the quota layer's settle (``lua_source("settle")``) and the pool's
  release of the seat (``lua/settle_release.lua``): one script call instead of two, both
  halves or neither.

Each script stays its layer's own, and so do the layout of its arguments
(``RedisQuotaStore.reserve_args``/``settle_args``, ``RedisSeatStore.acquire_args``/
``release_args``) and the reading of its reply (``reserved``, ``acquired``, ``released``).

Failures: the quota failure policy answers for the reservation as for a reservation alone
(``FailoverQuotaStore.reserve_by``); no seat status is returned then, and the admission
layer's own ``acquire`` applies the admission failure policy (during an outage, without a
call). A seat request whose call was given up on is released once Redis answers again, as an
acquire's is. The deadline is the reservation's, in Redis time: run later, the script writes
nothing for either half (the seat request, run in the same script, needs none of its own).
A joint settle and release that failed is handled by each store as its own call would be
(``FailoverQuotaStore.settle_by``: not sent again, the reservation stays charged and its slot
is freed once Redis answers; the release is sent again then, which changes nothing if the
first one ran). For a seat the pool did not grant in Redis (failure policies), or while Redis
is down, ``settle_release`` declines and the quota layer settles and releases each as alone.
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


def compose(quota: str, admission: str, *, settle: bool = False) -> str:
    """A joint script: the quota layer's reservation (or, with ``settle``, its settle) and
    the admission layer's script (whole scripts of ``KEYS`` and ``ARGV``; the admission one
    may be handed Redis time, ``now_ms``) as local functions, then the dispatcher."""
    name, dispatcher = ("quota_settle", "settle_release") if settle else ("quota_reserve", "joint")
    dispatch = (files("tenantware.joint") / "lua" / f"{dispatcher}.lua").read_text()
    return (
        f"local function {name}(KEYS, ARGV)\n{quota}\nend\n"
        f"local function admission(KEYS, ARGV, now_ms)\n{admission}\nend\n{dispatch}"
    )


_SCRIPT = compose(quota_source("reserve"), admission_source())
_SETTLE_RELEASE = compose(quota_source("settle"), admission_source(), settle=True)


class RedisReserveAcquire:
    """``RedisReserveAcquire(quota, primary)``: the quota store with its failure policies and
    the Redis store inside it; seat pools on the same connection are ``add``-ed."""

    def __init__(self, quota: FailoverQuotaStore, primary: RedisQuotaStore) -> None:
        self.quota = quota
        self.primary = primary
        self._script: Any = register_script(primary.client, _SCRIPT)
        self._settle_release: Any = register_script(primary.client, _SETTLE_RELEASE)
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

    async def settle_release(
        self,
        plan: Plan,
        now_us: int,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        charge_delta: int,
        seats: SeatStore,
        seat_ticket: Ticket,
        actual_cost: float,
        actual_tokens: float,
    ) -> bool:
        pool = self._pools[seats]
        if not pool.sends_release(seat_ticket):
            return False  # the seat is not the pool's in Redis now (failure policies)
        primary = self.primary
        made = False

        async def call() -> None:
            nonlocal made
            made = True
            arg = primary.settle_args(
                plan, now_us, ticket, tokens_delta, cost_delta, charge_delta=charge_delta
            )
            args = pool.release_args(seat_ticket, actual_cost, actual_tokens)
            try:
                granted = await self._settle_release(
                    keys=[*plan.keys, *pool.keys], args=[arg, *pool.release_argv(args)]
                )
            except STORE_UNAVAILABLE as exc:
                pool.release_failed(args, exc)
                raise
            await pool.released(granted)

        await self.quota.settle_by(plan, ticket, call)
        if not made:  # the quota store is down: the pool's own rules for its release
            await pool.start_release(seat_ticket, actual_cost, actual_tokens)
        return True
