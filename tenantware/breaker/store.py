"""Where circuits live: the ``BreakerStore`` protocol (``memory.py``, ``redis.py``).

``gate`` is synchronous and cheap (a dict lookup and a comparison) because every request asks
it; the Redis store answers it from a local copy that ``refresh`` keeps fresh. ``remote``
tells callers whether ``refresh`` does anything, so the memory path never awaits it, and
``record_now`` records without a coroutine whatever needs no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from tenantware.breaker.circuit import CircuitPolicy

__all__ = ["BreakerStore", "Clock", "TransitionListener"]

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

    def record_now(
        self,
        key: str,
        policy: CircuitPolicy,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
    ) -> bool:
        """Record ``outcome`` if that needs no I/O (``True``); else the caller awaits
        ``record`` (nothing was recorded)."""
        ...

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
