"""Circuit breaking: per-deployment and per-tenant circuits, in memory or shared via Redis.

``RedisBreakerStore`` (``breaker/redis.py``) is imported on first use, so that importing the
package does not load the ``redis`` library.
"""

from typing import TYPE_CHECKING, Any

from tenantware.breaker.board import (
    APP_DEPLOYMENT,
    RECORDED,
    BreakerBoard,
    CircuitOpen,
    Deployment,
    circuit_open,
)
from tenantware.breaker.circuit import (
    CLOSED,
    FAILURE,
    HALF_OPEN,
    LIMITED,
    OPEN,
    PASS,
    PROBE,
    RELEASE,
    SLOW,
    SUCCESS,
    TIMEOUT,
    Circuit,
    CircuitPolicy,
)
from tenantware.breaker.memory import MemoryBreakerStore
from tenantware.breaker.store import BreakerStore

__all__ = [
    "APP_DEPLOYMENT",
    "CLOSED",
    "FAILURE",
    "HALF_OPEN",
    "LIMITED",
    "OPEN",
    "PASS",
    "PROBE",
    "RECORDED",
    "RELEASE",
    "SLOW",
    "SUCCESS",
    "TIMEOUT",
    "BreakerBoard",
    "BreakerStore",
    "Circuit",
    "CircuitOpen",
    "CircuitPolicy",
    "Deployment",
    "MemoryBreakerStore",
    "RedisBreakerStore",
    "circuit_open",
]


def __getattr__(name: str) -> Any:
    if name == "RedisBreakerStore":
        from tenantware.breaker.redis import RedisBreakerStore

        return RedisBreakerStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from tenantware.breaker.redis import RedisBreakerStore
