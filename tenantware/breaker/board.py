"""The breaker board: every circuit of a gateway, shared by the breaker middleware and the proxy.

It knows the deployments of each model (one per upstream serving it; ``app/<model>`` when
the inner app is not the proxy), the fallback chain of each model, the two policies
(deployment and tenant), how many calls each deployment has in flight (for least-busy
choice), and it logs and exports every state change.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Final, NamedTuple

import structlog

from tenantware.breaker.circuit import (
    CLOSED,
    PASS,
    RELEASE,
    STATE_NAMES,
    CircuitPolicy,
)
from tenantware.breaker.memory import MemoryBreakerStore
from tenantware.breaker.store import BreakerStore, Clock
from tenantware.config import BreakerSettings, Upstream
from tenantware.context import Unavailable
from tenantware.metrics import BREAKER_STATE
from tenantware.registry import TenantView
from tenantware.state import Snapshot

__all__ = [
    "APP_DEPLOYMENT",
    "RECORDED",
    "BreakerBoard",
    "CircuitOpen",
    "Deployment",
    "circuit_open",
]

log = structlog.get_logger("tenantware.breaker")

#: Deployment name of outcomes recorded for an inner app that is not the proxy.
APP_DEPLOYMENT: Final = "app"
#: ``ctx.extra`` flag: the proxy recorded this request's outcome on its deployment's circuit
#: (so the breaker layer does not record it again against ``app/<model>``).
RECORDED: Final = "breaker.recorded"


class CircuitOpen(NamedTuple):
    """Decision: no deployment of ``model`` (nor an allowed fallback) may take a call now."""

    model: str
    #: Seconds until the first one may (finite, positive).
    wait_s: float
    #: Their circuits are open, they cool down after a 429, or some of each.
    why: Unavailable = "open"


class Deployment:
    """One upstream serving one model: the unit a circuit protects."""

    __slots__ = ("key", "model", "upstream", "weight")

    def __init__(self, model: str, upstream: Upstream | None) -> None:
        self.model = model
        self.upstream = upstream
        self.weight = upstream.weight if upstream is not None else 1.0
        self.key = f"{upstream.name if upstream is not None else APP_DEPLOYMENT}/{model}"

    def __repr__(self) -> str:
        return f"Deployment({self.key!r})"


class _Table:
    """Deployments and fallback chains of one config version, built once."""

    __slots__ = ("chains", "cumulative", "deployments", "version")

    def __init__(self, snapshot: Snapshot) -> None:
        settings = snapshot.config.breaker
        self.version = snapshot.version
        self.deployments: dict[str, tuple[Deployment, ...]] = {
            model: tuple(Deployment(model, upstream) for upstream in upstreams)
            for model, upstreams in snapshot.routes.items()
        }
        resolve = snapshot.catalogue.resolve
        self.chains: dict[str, tuple[str, ...]] = {}
        for model, chain in settings.fallbacks.items():
            primary = resolve(model) or model
            names = [primary]
            for name in chain:
                canonical = resolve(name) or name
                if canonical not in names and canonical in self.deployments:
                    names.append(canonical)
            self.chains[primary] = tuple(names)
        #: Per model: running sums of the deployments' weights (weighted choice by bisect).
        self.cumulative: dict[str, list[float]] = {
            model: list(itertools.accumulate(d.weight for d in found))
            for model, found in self.deployments.items()
        }


class BreakerBoard:
    """``BreakerBoard(settings, store)``: the store defaults to circuits in this process."""

    def __init__(
        self,
        settings: BreakerSettings,
        store: BreakerStore | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._apply(settings)
        if store is None:
            store = MemoryBreakerStore(clock=clock)
        self.store: BreakerStore = store
        self.remote = self.store.remote
        #: Calls in flight per deployment key, in this process.
        self.inflight: dict[str, int] = {}
        self._table: _Table | None = None
        self._app_deployments: dict[str, tuple[Deployment, ...]] = {}
        self._tenant_keys: dict[str, str] = {}
        self.store.set_listener(self._on_transition)

    # -- deployments and chains --------------------------------------------------------------

    def _apply(self, settings: BreakerSettings) -> None:
        self.settings = settings
        #: Off: every gate passes and nothing is recorded (turning it on needs a restart,
        #: since the middleware is only mounted when it is on at start).
        self.enabled = settings.enabled
        self.deployment_policy = CircuitPolicy(settings.deployment)
        self.tenant_policy = CircuitPolicy(settings.tenant)

    def table(self, snapshot: Snapshot) -> _Table:
        """Deployments and chains of this config version; a reload also brings new settings."""
        table = self._table
        if table is None or table.version != snapshot.version:
            if snapshot.config.breaker != self.settings:
                self._apply(snapshot.config.breaker)
            table = self._table = _Table(snapshot)
        return table

    def deployments(self, snapshot: Snapshot, model: str) -> tuple[Deployment, ...]:
        """Deployments of ``model``; a single ``app/<model>`` when no upstream serves it."""
        found = self.table(snapshot).deployments.get(model)
        if found is None:
            found = self._app_deployments.get(model)
            if found is None:
                found = self._app_deployments[model] = (Deployment(model, None),)
        return found

    def chain(self, snapshot: Snapshot, model: str, tenant: TenantView | None) -> tuple[str, ...]:
        """``model`` then its fallbacks that ``tenant`` may use, in order (the tenant's own
        fallback chain for ``model`` when it set one)."""
        if tenant is not None and tenant.fallbacks:
            own = tenant.fallbacks.get(model)
            if own is not None:
                # Checked when written; a model the configuration no longer serves is skipped.
                routes = snapshot.routes
                return (
                    model,
                    *(
                        name
                        for name in own
                        if name != model and tenant.may_use(name) and routes.get(name)
                    ),
                )
        chain = self.table(snapshot).chains.get(model)
        if chain is None:
            return (model,)
        if tenant is None or tenant.allowed_models is None:
            return chain
        return tuple(name for name in chain if name == model or tenant.may_use(name))

    async def refresh_chain(self, snapshot: Snapshot, chain: tuple[str, ...]) -> None:
        """Re-read stale shared circuits of every deployment of ``chain`` (Redis store)."""
        keys = [d.key for model in chain for d in self.deployments(snapshot, model)]
        await self.store.refresh(keys, self.deployment_policy)

    def chain_wait(self, snapshot: Snapshot, chain: tuple[str, ...]) -> float:
        """0 when some deployment of ``chain`` may take a call now (or a probe), else the
        seconds until the first one may."""
        if not self.enabled:
            return PASS
        gate = self.store.gate
        best = math.inf
        for model in chain:
            for deployment in self.deployments(snapshot, model):
                wait = gate(deployment.key)
                if wait <= 0.0:
                    return PASS
                best = min(best, wait)
        return best

    def unavailable(
        self, snapshot: Snapshot, model: str, chain: tuple[str, ...], wait_s: float
    ) -> CircuitOpen:
        """The decision when no deployment of ``chain`` may take a call for ``wait_s``: says
        whether their circuits are open or they only cool down after a 429 (refusals only)."""
        state = self.store.state
        gate = self.gate
        opened = cooling = False
        for name in chain:
            for deployment in self.deployments(snapshot, name):
                if gate(deployment.key) == PASS:
                    continue
                if state(deployment.key) == CLOSED:
                    cooling = True
                else:
                    opened = True
        why: Unavailable = (
            "open_and_cooling" if opened and cooling else ("cooling" if cooling else "open")
        )
        return circuit_open(model, wait_s, why)

    # -- circuits ----------------------------------------------------------------------------

    def gate(self, key: str) -> float:
        return self.store.gate(key) if self.enabled else PASS

    def state(self, key: str) -> int:
        return self.store.state(key)

    async def take_probe(self, key: str, policy: CircuitPolicy | None = None) -> bool:
        return await self.store.take_probe(key, policy or self.deployment_policy)

    async def record(
        self,
        key: str,
        outcome: int,
        *,
        probe: bool = False,
        cool_s: float = 0.0,
        policy: CircuitPolicy | None = None,
    ) -> None:
        if not self.enabled:
            return
        policy = policy or self.deployment_policy
        # Whatever needs no I/O is recorded without a coroutine (memory; Redis successes).
        if not self.store.record_now(key, policy, outcome, probe=probe, cool_s=cool_s):
            await self.store.record(key, policy, outcome, probe=probe, cool_s=cool_s)

    async def release(self, key: str, policy: CircuitPolicy | None = None) -> None:
        """Give back a probe slot that was taken but not used."""
        await self.record(key, RELEASE, probe=True, policy=policy)

    def tenant_key(self, tenant_id: str) -> str:
        key = self._tenant_keys.get(tenant_id)
        if key is None:
            key = self._tenant_keys[tenant_id] = "tenant:" + tenant_id
        return key

    def _on_transition(self, key: str, old: int, new: int, wait_s: float) -> None:
        fields = {"circuit": key, "old": STATE_NAMES[old], "new": STATE_NAMES[new]}
        if new == CLOSED:
            log.info("circuit closed", **fields)
        else:
            log.warning("circuit state changed", next_probe_in_s=round(wait_s, 3), **fields)
        if not key.startswith("tenant:"):
            upstream, _, model = key.partition("/")
            BREAKER_STATE.labels(upstream, model).set(new)

    async def aclose(self) -> None:
        await self.store.aclose()


def circuit_open(model: str, wait_s: float, why: Unavailable = "open") -> CircuitOpen:
    """The decision for ``model`` when every deployment of its chain waits ``wait_s``."""
    return CircuitOpen(model, max(wait_s, 0.001) if math.isfinite(wait_s) else 1.0, why)
