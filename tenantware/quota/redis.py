"""The Redis quota store: one Lua script per decision, for many replicas and Redis Cluster.

Every key of a plan shares the tenant's hash tag, so each script touches one slot. Time comes
from Redis ``TIME`` (a ``clock`` may be injected for tests); keys expire with their windows.
Scripts are registered once and run with EVALSHA (reloaded on NOSCRIPT after a restart).

A reservation carries a deadline in Redis time (``backends/redis_clock.py``): run after it
(its caller gave up: Redis was paused or stalled), the script grants and writes nothing and
the call fails as ``StoreUnavailable``. With an injected ``clock`` there is no deadline.

Concurrency slots are leases (``quota.lease_s``): the store remembers the slots this process
holds until they are settled, and ``renew`` pushes all their expiries to a full lease from
now in one script call per hash slot (one call on a single server). A slot whose process
stopped renewing (it crashed, or Redis never got its settle) comes back after one lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import anyio

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.lua_args import pack_values
from tenantware.backends.multiplex import RedisTimeoutError
from tenantware.backends.redis_clock import RedisClock, budget_of
from tenantware.backends.redis_support import ScriptHost, register_script, single_node
from tenantware.quota.plan import (
    KIND_CONCURRENCY,
    Plan,
    balance_key,
    day_and_month,
    windows_at,
)
from tenantware.quota.store import Decision

__all__ = ["RedisQuotaStore", "lua_source"]


def lua_source(name: str) -> str:
    """A script of ``tenantware/quota/lua`` with the shared helpers in front (but settle,
    which needs none of them: its windows come from Python, ``windows_at``)."""
    folder = files("tenantware.quota") / "lua"
    script = (folder / f"{name}.lua").read_text()
    if name == "settle":
        return script
    return (folder / "common.lua").read_text() + "\n" + script


_RESERVE = lua_source("reserve")
_SETTLE = lua_source("settle")
_USAGE = lua_source("usage")
_RENEW = lua_source("renew")
#: Slots renewed per script call: bounds how long one renewal holds Redis.
_RENEW_BATCH = 1000
_CREDIT = lua_source("credit")
_RESTORE = lua_source("restore")
_BALANCE = lua_source("balance")


class RedisQuotaStore:
    """``RedisQuotaStore(client, prefix="app1:")``; ``client`` may be a ``RedisCluster`` or
    a ``MultiplexedRedis``. Failures raise ``StoreUnavailable`` (``FailoverQuotaStore``
    applies the policies)."""

    remote = True
    yields = True
    #: Every call is bounded by the outage rule of its client (the pipelined connection's
    #: watchdog, a redis-py client's progress watch): callers need no deadline of their own.
    bounded = True

    def __init__(
        self, client: ScriptHost, *, prefix: str = "", clock: Callable[[], float] | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.single_node = single_node(client)
        self._reserve: Any = register_script(client, _RESERVE)
        self._settle: Any = register_script(client, _SETTLE)
        self._usage: Any = register_script(client, _USAGE)
        self._renew: Any = register_script(client, _RENEW)
        #: ``(plan, ticket)`` of every granted reservation that holds a slot, until settled.
        self._held: set[tuple[Plan, str]] = set()
        self._credit: Any = register_script(client, _CREDIT)
        self._restore: Any = register_script(client, _RESTORE)
        self._balance: Any = register_script(client, _BALANCE)
        #: Redis time as last seen (µs), for the deadline of each reservation.
        self.redis_clock = RedisClock(1_000_000)
        self.budget_s = budget_of(client)

    def _now(self) -> int:
        return -1 if self.clock is None else int(self.clock() * 1_000_000)

    async def reserve(
        self, plan: Plan, tokens: int, cost: int, ticket: str, *, charge: int | None = None
    ) -> Decision:
        now, arg = self.reserve_args(plan, tokens, cost, ticket, charge)
        return self.reserved(plan, ticket, now, await self._reserve(keys=plan.keys, args=(arg,)))

    def reserve_args(
        self, plan: Plan, tokens: int, cost: int, ticket: str, charge: int | None = None
    ) -> tuple[int, bytes]:
        """The time argument and the one ``ARGV`` string of a reservation (``KEYS``:
        ``plan.keys``); ``reserved`` reads its reply. Apart so that another script can run
        the reservation (``tenantware.joint``) with the same layout."""
        now = self._now()
        deadline = self.redis_clock.deadline(self.budget_s) if now < 0 else 0
        return now, pack_values(
            now,
            tokens,
            cost,
            ticket,
            deadline,
            cost if charge is None else charge,
            str(tokens),
            str(cost),
            *day_and_month(now if now >= 0 else time.time_ns() // 1000),
        ) + plan.packed

    def reserved(self, plan: Plan, ticket: str, now: int, reply: Any) -> Decision:
        """The decision of a reservation's reply; raises ``StoreUnavailable`` when Redis ran
        it after its deadline (nothing was written)."""
        if reply[0] == -1:
            raise RedisTimeoutError("Redis ran the reservation after its deadline")
        if now < 0:
            self.redis_clock.observe(int(reply[3]))
        if plan.holds_slots and reply[0] == 1:
            self._held.add((plan, ticket))
        n = len(plan.keys)
        return Decision(
            reply[0] == 1,
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
            [int(x) for x in reply[4 : 4 + n]],
            [int(x) for x in reply[4 + n : 4 + 2 * n]],
        )

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
            return  # granted by a fallback limiter, not by this store
        arg = self.settle_args(
            plan,
            now_us,
            ticket,
            tokens_delta,
            cost_delta,
            cancel=cancel,
            charge_delta=charge_delta,
        )
        await self._settle(keys=plan.keys, args=(arg,))

    def settle_args(
        self,
        plan: Plan,
        now_us: int,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        *,
        cancel: bool = False,
        charge_delta: int | None = None,
    ) -> bytes:
        """The one ``ARGV`` string of a settle (``KEYS``: ``plan.keys``); the slot is no
        longer this process's to renew from here on. Apart so that another script can run
        the settle (``tenantware.joint``) with the same layout."""
        if plan.holds_slots:
            self._held.discard((plan, ticket))
        balance_delta = -(cost_delta if charge_delta is None else charge_delta)
        return (
            pack_values(
                str(tokens_delta),
                str(cost_delta),
                ticket,
                1 if cancel else 0,
                str(balance_delta),
                *windows_at(plan, now_us),
            )
            + plan.settle_packed
        )

    async def usage(self, plan: Plan) -> list[int]:
        reply = await self._usage(keys=plan.keys, args=(self._now(), 0, 0, "", *plan.args))
        return [int(x) for x in reply]

    def forget(self, plan: Plan, ticket: str) -> None:
        self._held.discard((plan, ticket))

    async def renew(self) -> int:
        if not self._held:
            return 0
        batches: dict[str, tuple[list[str], list[str | int]]] = {}
        for plan, ticket in self._held:
            for limit in plan.limits:
                if limit.kind == KIND_CONCURRENCY:
                    key = limit.key
                    # Keys of one plan share a hash tag; a single server takes every key.
                    slot = "" if self.single_node else key[key.find("{") : key.find("}") + 1]
                    keys, args = batches.setdefault(slot, ([], []))
                    keys.append(key)
                    args += (ticket, limit.p1)
        calls = [
            (keys[i : i + _RENEW_BATCH], args[2 * i : 2 * (i + _RENEW_BATCH)])
            for keys, args in batches.values()
            for i in range(0, len(keys), _RENEW_BATCH)
        ]
        now = self._now()
        if len(calls) == 1:
            reply = await self._renew(keys=calls[0][0], args=(now, *calls[0][1]))
            return int(reply[0])
        renewed = 0
        failure: list[Exception] = []

        async def renew_batch(keys: list[str], args: list[str | int]) -> None:
            nonlocal renewed
            try:
                reply = await self._renew(keys=keys, args=(now, *args))
            except STORE_UNAVAILABLE as exc:
                failure.append(exc)  # raised once every call has ended
            else:
                renewed += int(reply[0])

        async with anyio.create_task_group() as group:
            for keys, args in calls:
                group.start_soon(renew_batch, keys, args)
        if failure:
            raise failure[0]
        return renewed

    def _balance_keys(self, tenant_id: str) -> tuple[str, str]:
        key = balance_key(self.prefix, tenant_id)
        return key, key + ":credited"

    async def credit(self, tenant_id: str, entry_id: str, amount: int, low_nanousd: int) -> int:
        reply = await self._credit(
            keys=self._balance_keys(tenant_id), args=(entry_id, amount, low_nanousd)
        )
        return int(reply)

    async def balance(self, tenant_id: str) -> int | None:
        held, value = await self._balance(keys=self._balance_keys(tenant_id)[:1], args=())
        return int(value) if int(held) else None

    async def restore(self, tenant_id: str, balance: int, credited: list[str]) -> bool:
        reply = await self._restore(keys=self._balance_keys(tenant_id), args=(balance, *credited))
        return int(reply) == 1
