"""Where circuits live: the ``BreakerStore`` protocol and its in-memory implementation.

``gate`` is synchronous and cheap (a dict lookup and a comparison) because every request asks
it; the Redis store answers it from a local copy that ``refresh`` keeps fresh. ``remote``
tells callers whether ``refresh`` does anything, so the memory path never awaits it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from tenantware.breaker.circuit import CLOSED, PASS, Circuit, CircuitPolicy

__all__ = ["BreakerStore", "Clock", "MemoryBreakerStore", "TransitionListener"]

Clock = Callable[[], float]
#: Called with (circuit key, old state, new state, seconds until the next probe).
TransitionListener = Callable[[str, int, int, float], None]


class BreakerStore(Protocol):
    """Circuits by key (``upstream/model`` for deployments, ``tenant:<id>`` for tenants)."""

    #: True when state lives elsewhere and ``refresh`` must be awaited before ``gate``.
    remote: bool

    def set_listener(self, listener: TransitionListener) -> None: ...

    def gate(self, key: str) -> float:
        """``PASS``, ``PROBE`` or seconds to wait (see ``circuit.Circuit.gate``)."""
        ...

    def state(self, key: str) -> int: ...

    async def refresh(self, keys: Iterable[str], policy: CircuitPolicy) -> None: ...

    async def take_probe(self, key: str, policy: CircuitPolicy) -> bool: ...

    async def record(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> None: ...

    async def aclose(self) -> None: ...


def _ignore(key: str, old: int, new: int, wait_s: float) -> None:
    return None


class MemoryBreakerStore:
    """Circuits of one process (the default; also the Redis store's fallback when it fails)."""

    remote = False

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._circuits: dict[str, Circuit] = {}
        self._listener: TransitionListener = _ignore

    def set_listener(self, listener: TransitionListener) -> None:
        self._listener = listener

    def gate(self, key: str) -> float:
        circuit = self._circuits.get(key)
        if circuit is None or (circuit.state == CLOSED and circuit.cool_until == 0.0):
            return PASS
        return circuit.gate(self.clock())

    def state(self, key: str) -> int:
        circuit = self._circuits.get(key)
        return circuit.state if circuit is not None else CLOSED

    def circuit(self, key: str, policy: CircuitPolicy) -> Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit(policy)
        return circuit

    async def refresh(self, keys: Iterable[str], policy: CircuitPolicy) -> None:
        return None

    async def take_probe(self, key: str, policy: CircuitPolicy) -> bool:
        return self.take_probe_now(key, policy)

    def take_probe_now(self, key: str, policy: CircuitPolicy) -> bool:
        circuit = self.circuit(key, policy)
        old = circuit.state
        now = self.clock()
        granted = circuit.take_probe(now)
        if circuit.state != old:
            self._listener(key, old, circuit.state, 0.0)
        return granted

    async def record(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> None:
        self.record_now(key, policy, outcome, probe=probe, cool_s=cool_s)

    def record_now(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> None:
        """``record`` without a coroutine (the memory store never waits)."""
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit(policy)
        elif circuit.policy is not policy:
            circuit.policy = policy  # reloaded settings
        old = circuit.state
        now = self.clock()
        circuit.record(now, outcome, probe=probe, cool_s=cool_s)
        if circuit.state != old:
            self._listener(key, old, circuit.state, circuit.remaining(now))

    async def aclose(self) -> None:
        return None
