"""Which deployment a call goes to next, and how long to wait before re-trying one.

Deployments that are open or cooling are skipped. A deployment whose open period is over is
probed first (taking one of its half-open probe slots), so recovery is noticed promptly.
Otherwise one ready deployment of the first model of the chain that has any is chosen:
weighted at random, or the least busy (calls in flight / weight). Deployments this request
already tried come last, after every untried one of the whole chain.
"""

from __future__ import annotations

import bisect
import math
import random

from tenantware.breaker.board import BreakerBoard, Deployment
from tenantware.breaker.circuit import PASS, PROBE, PROBE_BUSY_WAIT_S
from tenantware.state import Snapshot

__all__ = ["Pick", "Router"]


class Pick:
    """The chosen deployment (``None`` when none may take a call) and what it cost."""

    __slots__ = ("deployment", "probe", "wait_s")

    def __init__(self, deployment: Deployment | None, probe: bool, wait_s: float) -> None:
        self.deployment = deployment
        self.probe = probe
        #: With no deployment: seconds until the first may take a call again.
        self.wait_s = wait_s


class Router:
    """Deployment choice and retry backoff over one ``BreakerBoard``."""

    def __init__(self, board: BreakerBoard, *, rng: random.Random | None = None) -> None:
        self.board = board
        self.rng = rng or random.Random()

    @property
    def least_busy(self) -> bool:
        return self.board.settings.strategy == "least_busy"

    async def pick(
        self,
        snapshot: Snapshot,
        chain: tuple[str, ...],
        tried: set[str] | None,
        allowed: frozenset[str] | None = None,
    ) -> Pick:
        """``allowed``: the only upstreams the tenant's requests may go to (``None``: all)."""
        board = self.board
        gate = board.gate
        if tried is None and allowed is None:
            # Usual case: every deployment of the requested model is ready.
            deployments = board.deployments(snapshot, chain[0])
            for deployment in deployments:
                if gate(deployment.key) != PASS:
                    break
            else:
                if len(deployments) == 1:
                    return Pick(deployments[0], False, 0.0)
                return Pick(self._choose_all(snapshot, chain[0], deployments), False, 0.0)
        best_wait = math.inf
        retry: list[Deployment] = []
        for model in chain:
            ready: list[Deployment] = []
            for deployment in board.deployments(snapshot, model):
                if allowed is not None and (
                    deployment.upstream is None or deployment.upstream.name not in allowed
                ):
                    continue
                wait = gate(deployment.key)
                again = tried is not None and deployment.key in tried
                if wait == PROBE and not again:
                    if await board.take_probe(deployment.key):
                        return Pick(deployment, True, 0.0)
                    best_wait = min(best_wait, PROBE_BUSY_WAIT_S)
                elif wait == PASS:
                    (retry if again else ready).append(deployment)
                elif wait > 0:
                    best_wait = min(best_wait, wait)
            if ready:
                return Pick(self._choose(ready), False, 0.0)
        if retry:
            return Pick(self._choose(retry), False, 0.0)
        return Pick(None, False, best_wait)

    def _choose_all(
        self, snapshot: Snapshot, model: str, deployments: tuple[Deployment, ...]
    ) -> Deployment:
        if self.least_busy:
            return self._choose(list(deployments))
        cumulative = self.board.table(snapshot).cumulative[model]
        return deployments[bisect.bisect(cumulative, self.rng.random() * cumulative[-1])]

    def _choose(self, ready: list[Deployment]) -> Deployment:
        if len(ready) == 1:
            return ready[0]
        if self.least_busy:
            inflight = self.board.inflight
            return min(ready, key=lambda d: (inflight.get(d.key, 0) / d.weight, -d.weight))
        return self.rng.choices(ready, weights=[d.weight for d in ready])[0]

    def backoff(self, retry: int) -> float:
        """Full jitter: uniform(0, min(cap, base * 2**retry)) seconds (retry counts from 0)."""
        settings = self.board.settings
        ceiling = min(settings.retry_max_backoff_s, settings.retry_base_s * 2 ** min(retry, 30))
        return self.rng.uniform(0.0, ceiling)
