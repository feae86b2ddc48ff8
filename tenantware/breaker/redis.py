"""Circuits shared by every gateway process through Redis, without a round trip per request.

Each circuit is one hash changed only by ``lua/breaker.lua`` (one script per decision, time
from Redis ``TIME``). The request path reads a local copy of each circuit:

- successes are counted locally and sent with the next script call, so a healthy deployment
  costs no Redis call at all between syncs;
- failures, 429 cool-downs, probe grants and probe answers go to Redis at once (one call),
  and the script's answer refreshes the local copy;
- a copy older than ``sync_interval_s`` is re-read (and pending successes flushed) by
  ``refresh`` before the next decision.

The trade-off: another process learns of an open circuit within ``sync_interval_s`` (or on
its own next failure, which is immediate), and the shared rate window lags the successes of
each process by at most that long. Consecutive failures are counted per process and added up
(a success resets only its own process's run): otherwise one process's successes, arriving
in batches, would reset the count of another that keeps failing.

When Redis fails, decisions fall back to circuits kept in process (every outcome is also
recorded there), so a Redis outage costs protection sharing, never traffic: the breaker's
failure policy is always ``local`` (``backends/failover.py``). They do so too while the
connection of the quota and admission layers (``follows``) has declared an outage of the same
Redis: a request that waited the bound there does not wait for that Redis again here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.failover import Failover, StoreHealth
from tenantware.backends.keys import tenant_key
from tenantware.backends.redis_support import RedisClient, register_script
from tenantware.breaker.circuit import (
    BUCKETS,
    CLOSED,
    FAILURE,
    HALF_OPEN,
    LIMITED,
    OPEN,
    PASS,
    PROBE,
    PROBE_BUSY_WAIT_S,
    RELEASE,
    SLOW,
    SUCCESS,
    TIMEOUT,
    CircuitPolicy,
)
from tenantware.breaker.memory import MemoryBreakerStore
from tenantware.breaker.store import Clock, TransitionListener

__all__ = ["RedisBreakerStore"]

_SCRIPT = resources.files("tenantware.breaker").joinpath("lua/breaker.lua").read_text()
_TAKE = 4
_PROBE_MODE = {SUCCESS: 1, SLOW: 1, FAILURE: 2, TIMEOUT: 2, LIMITED: 3, RELEASE: 3}
#: Outcomes of ordinary calls that only count (sent with the next script call).
_COUNTED_LOCALLY = frozenset({SUCCESS, SLOW, RELEASE})


class _Copy:
    """The local copy of one circuit; deadlines are in this process's clock."""

    __slots__ = ("cool_until", "fetched", "open_until", "probes_left", "state")

    def __init__(self) -> None:
        self.state = CLOSED
        self.open_until = 0.0
        self.cool_until = 0.0
        self.probes_left = 0
        self.fetched = -1e18


class RedisBreakerStore:
    """``RedisBreakerStore(redis, prefix=...)``; ``clock`` (seconds) replaces Redis ``TIME``
    in tests that need to move time by hand."""

    remote = True

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "",
        sync_interval_s: float = 0.5,
        clock: Clock | None = None,
        health: StoreHealth | None = None,
        follows: StoreHealth | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.sync_interval_s = sync_interval_s
        self._fixed_clock = clock
        self._now: Clock = clock or time.monotonic
        self.local = MemoryBreakerStore(clock=self._now)
        self._script: Any = register_script(redis, _SCRIPT)
        self._copies: dict[str, _Copy] = {}
        #: Keys whose re-read is in flight.
        self._refreshing: set[str] = set()
        #: Per key: [successes, slow successes] not yet sent.
        self._pending: dict[str, list[int]] = {}
        self._redis_keys: dict[str, str] = {}
        self._policy_args: dict[CircuitPolicy, list[str]] = {}
        self._policies: dict[str, CircuitPolicy] = {}
        #: Circuit state is protection, not a limit: during an outage the local circuits
        #: decide (the ``local`` policy); one call probes Redis per interval (the shared
        #: health's, else ``sync_interval_s``).
        self.failover = Failover(
            "breaker", health, probe_interval_s=sync_interval_s, clock=self._now
        )
        #: The health of the outer layers' connection to the same Redis, when this client is
        #: another one: its outage holds here too (no call, no probe: the outer layers' probe
        #: ends it), while this client's own failures do not declare it (its evidence, answered
        #: calls, is not that connection's).
        self._follows = follows
        self._health = self.failover.health
        #: Names this store's run of consecutive failures in each circuit's hash.
        self.process_id = secrets.token_hex(8)
        self._listener: TransitionListener = self.local._listener

    def set_listener(self, listener: TransitionListener) -> None:
        # The local circuits only stand in during an outage; their changes are not news.
        self._listener = listener

    # -- reads from the local copy -----------------------------------------------------------

    def gate(self, key: str) -> float:
        # Redis is out: this store's calls failed, or the connection it follows declared it
        # (the health objects read directly: this runs for every request).
        follows = self._follows
        down = self._health.down or (follows is not None and follows.down)
        copy = self._copies.get(key)
        if copy is None or (copy.state == CLOSED and copy.cool_until == 0.0):
            if down:
                return self.local.gate(key)
            return PASS
        now = self._now()
        if down:
            return self.local.gate(key)
        cool = copy.cool_until - now if copy.cool_until > now else 0.0
        if copy.state == CLOSED:
            return cool if cool > 0 else PASS
        if copy.state == OPEN and now < copy.open_until:
            return max(cool, copy.open_until - now)
        if cool > 0:
            return cool
        if copy.state == HALF_OPEN and copy.probes_left <= 0:
            return PROBE_BUSY_WAIT_S
        return PROBE

    def state(self, key: str) -> int:
        copy = self._copies.get(key)
        return copy.state if copy is not None else CLOSED

    # -- calls to Redis ----------------------------------------------------------------------

    async def refresh(self, keys: Iterable[str], policy: CircuitPolicy) -> None:
        now = self._now()
        refreshing = self._refreshing
        for key in keys:
            copy = self._copies.get(key)
            # One re-read per key at a time: a burst of requests finding the copy stale
            # sends one call, not one each (the others decide on the copy meanwhile).
            if (copy is None or now - copy.fetched >= self.sync_interval_s) and (
                key not in refreshing
            ):
                refreshing.add(key)
                try:
                    await self._call(key, policy, 0, 0, 0)
                finally:
                    refreshing.discard(key)

    async def take_probe(self, key: str, policy: CircuitPolicy) -> bool:
        result = await self._call(key, policy, _TAKE, 0, 0)
        if result is None:
            return self.local.take_probe_now(key, policy)
        return bool(result[5])

    def record_now(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> bool:
        """Successes are counted here and sent with the next script call: no I/O."""
        if probe or outcome not in _COUNTED_LOCALLY:
            return False
        self.local.record_now(key, policy, outcome, probe=probe, cool_s=cool_s)
        if outcome != RELEASE:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = [0, 0]
                self._policies[key] = policy
            pending[outcome] += 1
        return True

    async def record(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> None:
        if self.record_now(key, policy, outcome, probe=probe, cool_s=cool_s):
            return
        self.local.record_now(key, policy, outcome, probe=probe, cool_s=cool_s)
        mode = _PROBE_MODE[outcome] if probe else 0
        failed = outcome in (FAILURE, TIMEOUT)
        fail = 1 if failed and not probe else 0
        cool_ms = int(cool_s * 1000) if outcome == LIMITED else 0
        await self._call(key, policy, mode, fail, cool_ms, 1 if outcome == TIMEOUT else 0)

    async def _call(
        self,
        key: str,
        policy: CircuitPolicy,
        mode: int,
        fail: int,
        cool_ms: int,
        slow_fail: int = 0,
    ) -> list[int] | None:
        failover = self.failover
        follows = self._follows
        if (follows is not None and follows.down) or not failover.available:
            # Redis failed a moment ago: decide locally, try it again after the interval (the
            # followed connection's outage: once one of its probes is answered).
            failover.degraded("local")
            return None
        pending = self._pending.pop(key, None)
        ok, slow = pending if pending is not None else (0, 0)
        fixed = self._fixed_clock
        args = [
            str(int(fixed() * 1000)) if fixed is not None else "",
            ok,
            slow,
            fail,
            fail,
            mode,
            cool_ms,
            *self._args(policy),
            self.process_id,
            slow_fail,
        ]
        try:
            raw = await self._script(keys=[self._redis_key(key)], args=args)
        except STORE_UNAVAILABLE as exc:
            failover.failed(exc, "breaker", policy="local")
            failover.degraded("local")
            return None
        if failover.down:
            failover.succeeded()
        result = [int(value) for value in raw]
        old, new, open_ms, cool_left_ms, probes_left, _granted = result
        now = self._now()
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = _Copy()
        seen = copy.state if copy.fetched > -1e18 else old
        copy.state = new
        copy.open_until = now + open_ms / 1000 if open_ms else 0.0
        copy.cool_until = now + cool_left_ms / 1000 if cool_left_ms else 0.0
        copy.probes_left = probes_left
        copy.fetched = now
        if new != seen:
            self._listener(key, seen, new, open_ms / 1000)
        return result

    def _redis_key(self, key: str) -> str:
        name = self._redis_keys.get(key)
        if name is None:
            if key.startswith("tenant:"):
                name = tenant_key(self.prefix, key[7:], "breaker")
            else:
                name = f"{self.prefix}tw:{{breaker:{key}}}"
            self._redis_keys[key] = name
        return name

    def _args(self, policy: CircuitPolicy) -> list[str]:
        args = self._policy_args.get(policy)
        if args is None:
            ttl_ms = int((max(policy.window_s, policy.max_wait_s) * 2 + 60) * 1000)
            args = [
                str(policy.consecutive),
                repr(policy.rate_percent),
                repr(policy.slow_rate_percent),
                str(policy.minimum_calls),
                str(max(1, int(policy.bucket_s * 1000))),
                str(BUCKETS),
                str(int(policy.wait_s * 1000)),
                str(int(policy.max_wait_s * 1000)),
                str(policy.probes),
                str(ttl_ms),
            ]
            self._policy_args[policy] = args
        return args

    async def flush(self) -> None:
        """Send every pending success now (tests; shutdown)."""
        for key in list(self._pending):
            await self._call(key, self._policies[key], 0, 0, 0)

    async def aclose(self) -> None:
        """Hand the successes counted here to Redis before the process goes."""
        await self.flush()
