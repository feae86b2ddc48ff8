"""The Redis quota store: one Lua script per decision, for many replicas and Redis Cluster.

Every key of a plan shares the tenant's hash tag, so each script touches one slot. Time comes
from Redis ``TIME`` (a ``clock`` may be injected for tests); keys expire with their windows.
Scripts are registered once and run with EVALSHA (reloaded on NOSCRIPT after a restart).

A reservation carries a deadline in Redis time (``backends/redis_clock.py``): run after it
(its caller gave up: Redis was paused or stalled), the script grants and writes nothing and
the call fails as ``StoreUnavailable``. With an injected ``clock`` there is no deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import Any

from tenantware.backends.multiplex import RedisTimeoutError
from tenantware.backends.redis_clock import RedisClock, budget_of
from tenantware.backends.redis_support import ScriptHost, register_script, single_node
from tenantware.quota.plan import Plan, balance_key
from tenantware.quota.store import Decision

__all__ = ["RedisQuotaStore", "lua_source"]


def lua_source(name: str) -> str:
    """A script of ``tenantware/quota/lua`` with the shared helpers in front."""
    folder = files("tenantware.quota") / "lua"
    common = (folder / "common.lua").read_text()
    return common + "\n" + (folder / f"{name}.lua").read_text()


_RESERVE = lua_source("reserve")
_SETTLE = lua_source("settle")
_USAGE = lua_source("usage")
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
        now = self._now()
        deadline = self.redis_clock.deadline(self.budget_s) if now < 0 else 0
        reply = await self._reserve(
            keys=plan.keys,
            args=(
                now,
                tokens,
                cost,
                ticket,
                *plan.args,
                deadline,
                cost if charge is None else charge,
            ),
        )
        if reply[0] == -1:
            raise RedisTimeoutError("Redis ran the reservation after its deadline")
        if now < 0:
            self.redis_clock.observe(int(reply[3]))
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
        balance_delta = -(cost_delta if charge_delta is None else charge_delta)
        await self._settle(
            keys=plan.keys,
            args=(
                now_us,
                tokens_delta,
                cost_delta,
                ticket,
                1 if cancel else 0,
                *plan.args,
                balance_delta,
            ),
        )

    async def usage(self, plan: Plan) -> list[int]:
        reply = await self._usage(keys=plan.keys, args=(self._now(), 0, 0, "", *plan.args))
        return [int(x) for x in reply]

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
