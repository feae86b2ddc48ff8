"""Circuit breaking: per-deployment and per-tenant circuits, in memory or shared via Redis."""

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
    Circuit,
    CircuitPolicy,
)
from tenantware.breaker.redis_store import RedisBreakerStore
from tenantware.breaker.store import BreakerStore, MemoryBreakerStore

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
