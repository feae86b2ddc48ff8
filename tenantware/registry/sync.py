"""Keeps this process's snapshot equal to the registry: pub/sub first, a version check behind.

A writer announces each new version on pub/sub; every process reloads the registry when it
hears a version newer than its own. A message can be lost (the subscription drops, Redis
restarts), so each process also reads the version every ``check_s`` seconds. While the
registry cannot be reached, the process keeps serving from its last copy and says so
(``status()``, the ``tenantware_registry_stale`` metric, ``/readyz``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.config import AdminKey, ConfigError, GatewayConfig, Tenant
from tenantware.metrics import REGISTRY_STALE, REGISTRY_VERSION
from tenantware.registry.memory import MemoryRegistryStore
from tenantware.registry.rules import RuntimeRules, decode_rules, encode_rules
from tenantware.registry.store import RegistryStore
from tenantware.state import LiveConfig

__all__ = ["RegistrySync"]

log = structlog.get_logger("tenantware.registry")

#: First wait before listening again after the subscription was lost.
RESUBSCRIBE_MIN_S = 0.05


class RegistrySync:
    """``RegistrySync(live, store)``; ``async with sync.running():`` for the process's life."""

    def __init__(self, live: LiveConfig, store: RegistryStore, *, check_s: float = 1.0) -> None:
        self.live = live
        self.store = store
        self.check_s = check_s
        self._lock = anyio.Lock()
        #: Monotonic time the registry stopped answering; ``None`` while it answers.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        live.tenants_follow_file = not store.shared
        if isinstance(store, MemoryRegistryStore):
            live.on_file_reload(self._file_reloaded)

    def _file_reloaded(self, config: GatewayConfig) -> None:
        assert isinstance(self.store, MemoryRegistryStore)
        self.store.reset(config.tenants)

    @property
    def stale(self) -> bool:
        return self.failing_since is not None

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` shows about the registry (never its URL)."""
        body: dict[str, Any] = {
            "status": "stale" if self.stale else "ok",
            "shared": self.store.shared,
            "version": self.live.current.registry_version,
        }
        if self.failing_since is not None:
            body["stale_for_s"] = round(time.monotonic() - self.failing_since, 3)
            body["error"] = self.last_error
        return body

    async def refresh(self) -> int:
        """Copy the registry into a new snapshot if it moved on; the version now in force.

        A shared registry that was never written (or lost its data: a Redis restarted
        without persistence) is seeded with this process's tenants: the file's at first
        start, else its last copy, with the rules changed through the admin API it holds
        (``seed`` is atomic: of many replicas, one seeds).
        """
        async with self._lock:
            state = await self.store.load()
            if not state.initialized:
                await self.store.seed(
                    list(self.live.current.config.tenants), encode_rules(self.live.rules)
                )
                state = await self.store.load()
            self._answered()
            current = self.live.current.registry_version
            if state.version > current or (state.version != current and self.store.shared):
                tenants = [state.records[k].tenant for k in sorted(state.records)]
                admins = [state.admins[k] for k in sorted(state.admins)]
                try:
                    rules = decode_rules(state.rules)
                    await self._install(tenants, admins, rules, state.version)
                except (ConfigError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                    # A tenant or rule the file's settings cannot take (a tier or an upstream
                    # the file dropped): keep the last good table rather than refuse them all.
                    log.error("registry version rejected; keeping the last", error=str(exc))
                    return current
                REGISTRY_VERSION.set(state.version)
            return self.live.current.registry_version

    async def _install(
        self,
        tenants: list[Tenant],
        admins: list[AdminKey],
        rules: RuntimeRules,
        registry_version: int,
    ) -> None:
        """Index the table in a worker thread (requests go on meanwhile), then swap it in on
        the event loop; built again if a file reload came in between."""
        for _ in range(3):
            pending = await anyio.to_thread.run_sync(
                functools.partial(
                    self.live.build_tenants,
                    tenants,
                    registry_version=registry_version,
                    admin_keys=admins,
                    rules=rules,
                )
            )
            if self.live.install(pending) is not None:
                return
        self.live.set_tenants(
            tenants, registry_version=registry_version, admin_keys=admins, rules=rules
        )

    def _answered(self) -> None:
        if self.failing_since is not None:
            log.info("registry reachable again")
        self.failing_since = None
        self.last_error = None
        REGISTRY_STALE.set(0)

    def _failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("registry unreachable; serving the last copy", error=type(exc).__name__)
        self.last_error = str(exc) or type(exc).__name__
        REGISTRY_STALE.set(1)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Load the registry, then follow it until the block ends (shared registries only)."""
        try:
            await self.refresh()
        except STORE_UNAVAILABLE as exc:
            # No copy yet: the file's tenants serve until the registry answers.
            self._failed(exc)
        if not self.store.shared:
            yield
            return
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen)
            group.start_soon(self._check)
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    async def _listen(self) -> None:
        # A lost subscription is not an outage (the version check declares those): listen
        # again soon, backing off up to the check interval while it keeps failing.
        delay = RESUBSCRIBE_MIN_S
        while True:
            try:
                async with contextlib.aclosing(self.store.changes()) as changes:
                    async for version in changes:
                        delay = RESUBSCRIBE_MIN_S
                        if version > self.live.current.registry_version:
                            await self.refresh()
            except STORE_UNAVAILABLE as exc:
                log.debug("registry subscription lost", error=type(exc).__name__)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.check_s)

    async def _check(self) -> None:
        while True:
            await anyio.sleep(self.check_s)
            try:
                if await self.store.version() != self.live.current.registry_version:
                    await self.refresh()
                else:
                    self._answered()
            except STORE_UNAVAILABLE as exc:
                self._failed(exc)
