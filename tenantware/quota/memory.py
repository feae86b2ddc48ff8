"""The in-memory quota store: one process, the same arithmetic as the Redis scripts.

Each ``reserve``/``settle`` runs without an ``await`` in between its checks and its writes,
so on one event loop it is as atomic as a Lua script. The clock is injectable (tests drive
it); it returns Unix seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tenantware.quota.plan import (
    KIND_BALANCE,
    KIND_CONCURRENCY,
    KIND_MONTHLY_SPEND,
    KIND_REQUESTS,
    KIND_TOKENS,
    Plan,
    balance_key,
    month_index,
)
from tenantware.quota.store import Decision

__all__ = ["MemoryQuotaStore"]

_RETRY_CONCURRENCY_US = 1_000_000


class MemoryQuotaStore:
    """``MemoryQuotaStore(clock=time.time)``: the embedded default."""

    single_node = True
    remote = False
    #: Nothing here waits: no deadline, no shield.
    bounded = True
    yields = False

    def __init__(self, *, prefix: str = "", clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock
        #: GCRA theoretical arrival time per key (microseconds).
        self._tat: dict[str, int] = {}
        #: Window counters per key: ``[window id, value]``.
        self._windows: dict[str, list[int]] = {}
        #: Concurrency leases per key: ticket -> expiry (microseconds).
        self._leases: dict[str, dict[str, int]] = {}
        #: The lease of each concurrency key (microseconds), for ``renew``.
        self._lease_us: dict[str, int] = {}
        #: Prepaid balances per key (nano-USD).
        self._balances: dict[str, int] = {}
        #: Balance keys warned of a low balance since their last credit.
        self._warned: set[str] = set()
        #: Journal entries credited per balance key (a credit applies once).
        self._credited: dict[str, set[str]] = {}

    def _now(self) -> int:
        return int(self.clock() * 1_000_000)

    async def reserve(
        self, plan: Plan, tokens: int, cost: int, ticket: str, *, charge: int | None = None
    ) -> Decision:
        return self.reserve_now(plan, tokens, cost, ticket, charge=charge)

    def reserve_now(
        self, plan: Plan, tokens: int, cost: int, ticket: str, *, charge: int | None = None
    ) -> Decision:
        """``reserve`` without the coroutine (the local fallback limiter calls it)."""
        now = self._now()
        if charge is None:
            charge = cost
        limits = plan.limits
        remaining = [0] * len(limits)
        reset = [0] * len(limits)
        staged: list[int] = [0] * len(limits)
        failed = -1
        budget_failed = -1
        retry = 0
        for i, limit in enumerate(limits):
            kind = limit.kind
            if kind == KIND_REQUESTS:
                tat = max(self._tat.get(limit.key, now), now)
                new = tat + limit.p1
                if new - now > limit.p2:
                    failed = i if failed < 0 else failed
                    retry = max(retry, new - limit.p2 - now)
                    reset[i] = tat - now
                else:
                    remaining[i] = (limit.p2 - (new - now)) // limit.p1
                    reset[i] = new - now
                    staged[i] = new
            elif kind == KIND_CONCURRENCY:
                leases = self._leases.get(limit.key)
                held = 0
                if leases:
                    for held_ticket in [t for t, exp in leases.items() if exp <= now]:
                        del leases[held_ticket]
                    held = len(leases)
                if held >= limit.p2:
                    failed = i if failed < 0 else failed
                    retry = max(retry, _RETRY_CONCURRENCY_US)
                    reset[i] = _RETRY_CONCURRENCY_US
                else:
                    remaining[i] = limit.p2 - held - 1
            elif kind == KIND_BALANCE:
                balance = self._balances.get(limit.key, 0)
                if balance <= 0 or balance < charge:
                    remaining[i] = max(0, balance)
                    if budget_failed < 0:
                        budget_failed = i
                else:
                    remaining[i] = balance - charge
            else:
                if kind == KIND_MONTHLY_SPEND:
                    window = month_index(now)
                else:
                    window = now // limit.p1
                    reset[i] = (window + 1) * limit.p1 - now
                amount = tokens if kind == KIND_TOKENS else cost
                state = self._windows.get(limit.key)
                used = state[1] if state is not None and state[0] == window else 0
                if used + amount > limit.p2:
                    remaining[i] = max(0, limit.p2 - used)
                    if kind == KIND_TOKENS:
                        failed = i if failed < 0 else failed
                        retry = max(retry, reset[i])
                    elif budget_failed < 0:
                        budget_failed = i
                else:
                    remaining[i] = limit.p2 - used - amount
                    staged[i] = window
        if budget_failed >= 0:
            return Decision(False, budget_failed, 0, now, remaining, reset)
        if failed >= 0:
            return Decision(False, failed, retry, now, remaining, reset)
        for i, limit in enumerate(limits):
            kind = limit.kind
            if kind == KIND_REQUESTS:
                self._tat[limit.key] = staged[i]
            elif kind == KIND_CONCURRENCY:
                self._leases.setdefault(limit.key, {})[ticket] = now + limit.p1
                self._lease_us[limit.key] = limit.p1
            elif kind == KIND_BALANCE:
                left = self._balances.get(limit.key, 0) - charge
                self._balances[limit.key] = left
                if left < limit.p1 and limit.key not in self._warned:
                    self._warned.add(limit.key)
                    reset[i] = 1  # this reservation crossed the low-balance threshold
            else:
                amount = tokens if kind == KIND_TOKENS else cost
                state = self._windows.get(limit.key)
                if state is not None and state[0] == staged[i]:
                    state[1] += amount
                else:
                    self._windows[limit.key] = [staged[i], amount]
        return Decision(True, -1, 0, now, remaining, reset)

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
        if not local:  # this store has no fallback limiter of its own
            self.settle_now(
                plan,
                now_us,
                ticket,
                tokens_delta,
                cost_delta,
                cancel=cancel,
                charge_delta=charge_delta,
            )

    def settle_now(
        self,
        plan: Plan,
        now_us: int,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        *,
        cancel: bool = False,
        charge_delta: int | None = None,
    ) -> None:
        """``settle`` without the coroutine."""
        if charge_delta is None:
            charge_delta = cost_delta
        for limit in plan.limits:
            kind = limit.kind
            if kind == KIND_REQUESTS:
                if cancel and limit.key in self._tat:
                    self._tat[limit.key] -= limit.p1
            elif kind == KIND_CONCURRENCY:
                leases = self._leases.get(limit.key)
                if leases is not None:
                    leases.pop(ticket, None)
            elif kind == KIND_BALANCE:
                if charge_delta:
                    self._balances[limit.key] = self._balances.get(limit.key, 0) - charge_delta
            else:
                delta = tokens_delta if kind == KIND_TOKENS else cost_delta
                if not delta:
                    continue
                window = month_index(now_us) if kind == KIND_MONTHLY_SPEND else now_us // limit.p1
                state = self._windows.get(limit.key)
                # A window that has already rolled over is not corrected: nobody reads it.
                if state is not None and state[0] == window:
                    state[1] += delta

    def forget(self, plan: Plan, ticket: str) -> None:
        pass  # every settle reaches this store

    async def renew(self) -> int:
        return self.renew_now()

    def renew_now(self) -> int:
        """``renew`` without the coroutine: every slot held here is this process's."""
        now = self._now()
        renewed = 0
        for key, leases in self._leases.items():
            lease = self._lease_us[key]
            for ticket, expiry in leases.items():
                if expiry > now:  # an expired slot is not brought back
                    leases[ticket] = now + lease
                    renewed += 1
        return renewed

    async def usage(self, plan: Plan) -> list[int]:
        now = self._now()
        out: list[int] = []
        for limit in plan.limits:
            kind = limit.kind
            if kind == KIND_REQUESTS:
                debt = max(0, self._tat.get(limit.key, now) - now)
                out.append(-(-debt // limit.p1))
            elif kind == KIND_CONCURRENCY:
                leases = self._leases.get(limit.key, {})
                out.append(sum(1 for exp in leases.values() if exp > now))
            elif kind == KIND_BALANCE:
                out.append(self._balances.get(limit.key, 0))
            else:
                window = month_index(now) if kind == KIND_MONTHLY_SPEND else now // limit.p1
                state = self._windows.get(limit.key)
                out.append(state[1] if state is not None and state[0] == window else 0)
        return out

    async def credit(self, tenant_id: str, entry_id: str, amount: int, low_nanousd: int) -> int:
        key = balance_key(self.prefix, tenant_id)
        credited = self._credited.setdefault(key, set())
        if entry_id not in credited:
            credited.add(entry_id)
            self._balances[key] = self._balances.get(key, 0) + amount
        balance = self._balances.get(key, 0)
        if balance >= low_nanousd:
            self._warned.discard(key)
        return balance

    async def balance(self, tenant_id: str) -> int | None:
        return self._balances.get(balance_key(self.prefix, tenant_id))

    async def restore(self, tenant_id: str, balance: int, credited: list[str]) -> bool:
        key = balance_key(self.prefix, tenant_id)
        if key in self._balances:
            return False
        self._balances[key] = balance
        self._credited[key] = set(credited)
        return True
