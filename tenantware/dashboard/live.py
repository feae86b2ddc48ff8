"""The live part of the operator view, read from the running gateway's own objects."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tenantware.admission.pools import AdmissionPools
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.breaker.board import BreakerBoard
from tenantware.breaker.circuit import STATE_NAMES
from tenantware.dashboard.migration import MigrationSource
from tenantware.dashboard.schemas import CircuitStatus, LiveView, PoolStatus, StoreStatus
from tenantware.metering.ledger.writer import LedgerWriter
from tenantware.state import LiveConfig
from tenantware.stores import Stores

__all__ = ["LiveSources"]


class LiveSources:
    """The parts of one gateway the operator view shows; ``await sources.view()``."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        board: BreakerBoard,
        pools: AdmissionPools,
        stores: Stores,
        writer: LedgerWriter | None,
        registry: Callable[[], dict[str, Any]],
        migration: MigrationSource | None = None,
    ) -> None:
        self.live = live
        self.board = board
        self.pools = pools
        self.stores = stores
        self.writer = writer
        self.registry = registry
        #: The shadow/canary comparisons (``None``: a gateway without a proxy's runner).
        self.migration = migration

    def circuits(self) -> list[CircuitStatus]:
        snapshot = self.live.current
        board = self.board
        found = []
        for model, deployments in sorted(board.table(snapshot).deployments.items()):
            for deployment in deployments:
                key = deployment.key
                found.append(
                    CircuitStatus(
                        key=key,
                        upstream=key.partition("/")[0],
                        model=model,
                        state=STATE_NAMES[board.state(key)],
                        wait_s=round(max(0.0, board.gate(key)), 3),
                        inflight=board.inflight.get(key, 0),
                    )
                )
        return found

    async def pool_status(self) -> list[PoolStatus]:
        states = await self.pools.state()
        return [
            PoolStatus(
                pool=name,
                seats=int(state.get("seats", 0)),
                in_use=int(state.get("in_use", 0)),
                waiting=int(state.get("waiting", 0)),
            )
            for name, state in sorted(states.items())
        ]

    async def _pools(self) -> list[PoolStatus]:
        try:
            return await self.pool_status()
        except STORE_UNAVAILABLE:  # shown as the store being down
            return []

    async def view(self) -> LiveView:
        config = self.live.current.config
        stores = self.stores
        return LiveView(
            at=time.time(),
            breaker_enabled=self.board.enabled,
            circuits=self.circuits(),
            admission_enabled=config.admission.enabled,
            pools=await self._pools() if config.admission.enabled else [],
            store=StoreStatus(
                kind="redis" if stores.remote else "memory",
                shared=stores.remote,
                up=not stores.health.down,
            ),
            ledger=self.writer.health() if self.writer is not None else None,
            registry=self.registry(),
        )
