"""Circuits of one process: the default store, and the Redis store's stand-in when it fails."""

from __future__ import annotations

import time
from collections.abc import Iterable

from tenantware.breaker.circuit import CLOSED, PASS, Circuit, CircuitPolicy
from tenantware.breaker.store import Clock, TransitionListener

__all__ = ["MemoryBreakerStore"]


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
    ) -> bool:
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
        return True

    async def aclose(self) -> None:
        return None
