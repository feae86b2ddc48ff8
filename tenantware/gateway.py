"""Assembles the middleware stack, the proxy and their lifecycle from one configuration.

The order of layers is fixed here, outermost first (tenant, metering, quota, admission,
breaker): each later layer relies on what the earlier ones put in the request context.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from starlette.middleware import Middleware

from tenantware.admin.app import AdminApi
from tenantware.admission.pools import AdmissionPools
from tenantware.alerts.engine import AlertEngine
from tenantware.alerts.memory import MemoryAlertStore
from tenantware.alerts.store import AlertStore
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.balances import Balances, HmacTestProvider, PaymentProvider
from tenantware.breaker.board import BreakerBoard
from tenantware.cache import CacheStore, open_cache
from tenantware.config import ConfigError, GatewayConfig, expanded_url, failure_policy
from tenantware.crypto import KeyRing, key_provider
from tenantware.dashboard import DashboardApp, LiveSources, MigrationSource, is_dashboard_path
from tenantware.estimate import PromptEstimator, estimate_prompt_tokens
from tenantware.logbook import LogStore, MemoryLogStore, open_log_store
from tenantware.logbook.jobs import purge_expired
from tenantware.metering.ledger import (
    DEFAULT_LEDGER_URL,
    AuditLog,
    BalanceJournal,
    Ledger,
    LedgerUnavailable,
    LedgerWriter,
    MemoryLedger,
    RedisStreamPublisher,
    SpillFile,
    default_spill_path,
    open_ledger,
)
from tenantware.metering.routes import ADMIN_PREFIX, READY_PATH, TENANT_USAGE_PATHS, AdminApp
from tenantware.metering.telemetry import log_records, metrics_observer
from tenantware.middleware.admission import AdmissionMiddleware
from tenantware.middleware.breaker import BreakerMiddleware, TenantRefusals
from tenantware.middleware.cache import CacheMiddleware
from tenantware.middleware.metering import MeteringMiddleware, UsageRecorder
from tenantware.middleware.quota import QuotaMiddleware
from tenantware.middleware.requestlog import RequestLogMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.middleware.tracing import TracingMiddleware
from tenantware.proxy.app import ProxyApp, send_openapi
from tenantware.proxy.openapi import OPENAPI_PATH
from tenantware.proxy.upstream import UpstreamClient
from tenantware.quota.renewal import renewing
from tenantware.quota.store import QuotaStore
from tenantware.readiness import gateway_checks
from tenantware.registry.store import RegistryStore
from tenantware.registry.sync import RegistrySync
from tenantware.reload import watch_config
from tenantware.state import LiveConfig, Snapshot
from tenantware.stores import Stores, open_stores
from tenantware.tenantdata import TenantData
from tenantware.tracing import Tracing, open_tracing
from tenantware.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from tenantware.backends.redis_support import RedisClient

__all__ = ["Gateway"]

_log = structlog.get_logger("tenantware.gateway")


class Gateway:
    """One gateway: live config, the stores behind each layer, the proxy app.

    ``gateway.middleware()`` gives the stack for ``Starlette(middleware=...)``;
    ``gateway.wrap(app)`` applies it to any ASGI app and serves ``gateway.admin_app``'s routes
    (``/admin/``, ``/metrics``, ``/readyz``, ``/v1/usage``) beside it; ``gateway.asgi_app()`` is
    the standalone gateway (proxy under ``/v1``, ``/healthz``) that ``tenantware serve`` runs.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: str | os.PathLike[str] | None = None,
        upstream_client: UpstreamClient | None = None,
        estimator: PromptEstimator = estimate_prompt_tokens,
        ledger: Ledger | None = None,
        log_store: LogStore | None = None,
        cache_store: CacheStore | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.live = LiveConfig(config)
        self.config_path = config_path
        self.estimator = estimator
        settings = config.gateway
        #: Where every layer keeps its state: memory, or ``gateway.redis_url``.
        self.stores: Stores = open_stores(
            expanded_url(settings.redis_url, "gateway.redis_url"),
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            replicas=settings.replicas,
            on_failure=failure_policy(config, "admission"),
            probe_interval_s=config.quota.retry_store_after_s or settings.store_probe_interval_s,
        )
        #: Tenants and keys: the file's (in this process), or ``gateway.registry_url``'s.
        self.registry_store: RegistryStore = self.stores.registry_store(
            expanded_url(settings.registry_url, "gateway.registry_url"), tenants=config.tenants
        )
        self.registry = RegistrySync(
            self.live, self.registry_store, check_s=settings.registry_check_s
        )
        #: Processes serving this configuration (``tenantware serve --workers``): with more
        #: than one, the file registry refuses admin writes (they would reach one process).
        self.processes = settings.replicas
        #: Lifecycle for ``/readyz``: serving once ``running()`` has started every service,
        #: draining from the moment it begins to stop.
        self.started = False
        self.draining = False
        #: Async context managers entered for the gateway's lifetime (writers, pools).
        self._services: list[Callable[[], AbstractAsyncContextManager[Any]]] = []
        self.add_service(self._registry_service)
        #: Every circuit of this gateway, shared by ``BreakerMiddleware`` and the proxy.
        self.board = BreakerBoard(
            config.breaker,
            self.stores.breaker_store(sync_interval_s=config.breaker.sync_interval_s),
        )
        #: Which tenant created each response an upstream stores (``GET /v1/responses/{id}``).
        self.owners = self.stores.owner_store()
        self.proxy = ProxyApp(
            live=self.live, client=upstream_client, board=self.board, owners=self.owners
        )
        #: OpenTelemetry spans (``tracing.enabled``, or an app's own ``tracer_provider``).
        self.tracing: Tracing | None = (
            Tracing(tracer_provider)
            if tracer_provider is not None
            else open_tracing(config.tracing)
        )
        if self.tracing is not None:
            self.proxy.dispatcher.tracing = self.tracing
            self._services.insert(0, self._tracing_service)  # entered first, left last
        #: Fair-share seat pools (memory, or Redis when ``gateway.redis_url`` is set).
        self.admission = AdmissionPools(
            config.admission, self.stores.seat_store, replicas=settings.replicas
        )
        self.add_service(self.admission.running)
        # Concurrency slots are short leases, renewed while their requests run.
        self.add_service(lambda: renewing(self.quota_store, self._lease_s))
        self.live.on_change(lambda snapshot: self.admission.reconfigure(snapshot.config.admission))
        self.ledger: Ledger | None = None
        self.writer: LedgerWriter | None = None
        if config.metering.enabled:
            self._setup_metering(ledger)
        #: Canary and shadow traffic: the shadow calls' task group lives as long as the
        #: gateway (after the ledger writer's service, so it ends first and its records land).
        self.migration = self.proxy.migration
        self.migration.writer = self.writer
        if self.redis is not None:
            # One report and one set of rollbacks for every process on this Redis.
            from tenantware.migration.redis import RedisReportStore

            self.migration.shared = RedisReportStore(self.redis, prefix=settings.redis_prefix)
        self.add_service(self.migration.running)
        self._setup_data(log_store, cache_store)
        #: Prepaid balances: the quota store holds them, the ledger journals them.
        self.balances: Balances | None = None
        if isinstance(self.ledger, BalanceJournal):
            self.balances = Balances(self.quota_store, self.ledger)
            self.add_service(self._balances_service)
        #: Alerts: only once a destination is configured (nothing runs or counts before).
        self.alerts: AlertEngine | None = None
        if config.alerts.active():
            self._setup_alerts()

    def _setup_data(self, logs: LogStore | None, cache: CacheStore | None) -> None:
        """Tenant keys, request logs and the response cache (nothing is opened yet)."""
        config = self.config
        data = config.data
        if logs is None:
            memory = isinstance(self.ledger, MemoryLedger) or not config.metering.enabled
            logs = MemoryLogStore() if memory else open_log_store(ledger_url(config))
        #: Request logs and tenant salts, beside the ledger.
        self.log_store: LogStore = logs
        #: Every tenant's data keys, from the master key and the tenant's salt.
        self.keyring = KeyRing(key_provider(data.master_key_env, data.master_key_file), logs)
        if cache is None:
            redis = self.redis if data.cache_url is None else None
            if redis is not None:
                from tenantware.cache.redis import RedisCacheStore

                cache = RedisCacheStore(redis, prefix=config.gateway.redis_prefix)
            else:
                cache = open_cache(
                    expanded_url(data.cache_url, "data.cache_url"),
                    prefix=config.gateway.redis_prefix,
                    timeout_s=config.gateway.redis_timeout_s,
                )
        #: Cached answers of the tenants that opted in.
        self.cache_store: CacheStore = cache
        self.tenant_data = TenantData(self.keyring, logs, cache)
        self.add_service(self._retention_service)

        def drop_gone_keys(snapshot: Snapshot) -> None:
            # A tenant deleted (here or on another replica) keeps no derived key here.
            for tenant in self.keyring.derived():
                if snapshot.registry.by_id(tenant) is None:
                    self.keyring.forget(tenant)

        self.live.on_change(drop_gone_keys)

    @asynccontextmanager
    async def _retention_service(self) -> AsyncIterator[None]:
        """Purges expired request logs every ``data.retention_interval_s``."""

        async def purge_forever() -> None:
            while True:
                snapshot = self.live.current
                tenants = [t.id for t in snapshot.registry.tenants() if t.data.log_requests]
                try:
                    await purge_expired(self.log_store, tenants)
                except STORE_UNAVAILABLE as exc:
                    _log.warning("retention_purge_failed", error=str(exc))
                await anyio.sleep(snapshot.config.data.retention_interval_s)

        async with anyio.create_task_group() as group:
            group.start_soon(purge_forever)
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    @asynccontextmanager
    async def _balances_service(self) -> AsyncIterator[None]:
        """At start, give the store each journaled balance it does not hold (always for the
        memory store: a new process starts empty)."""
        assert self.balances is not None
        assert self.ledger is not None
        try:
            await self.ledger.open()
            if self.writer is not None:
                # Debits a previous run spilled to its file go into the journal first.
                await self.writer.flush()
            await self.balances.restore()
        except LedgerUnavailable as exc:
            # Not fatal: a balance the store does not hold refuses its requests (never serves
            # them unpaid); the next start restores it.
            _log.warning("prepaid balances not restored from the journal", error=str(exc))
        except STORE_UNAVAILABLE as exc:
            _log.warning("prepaid balances not restored to the store", error=str(exc))
        yield

    def payment_providers(self) -> dict[str, PaymentProvider]:
        """The configured payment webhooks, their secrets read from the environment."""
        providers: dict[str, PaymentProvider] = {}
        for name, hook in self.config.gateway.payment_webhooks.items():
            secret = os.environ.get(hook.secret_env, "")
            if not secret:
                raise ConfigError(
                    f"gateway.payment_webhooks.{name}.secret_env: ${hook.secret_env} is not set"
                )
            providers[name] = HmacTestProvider(
                secret.encode(), name=name, tolerance_s=hook.tolerance_s
            )
        return providers

    def _setup_metering(self, ledger: Ledger | None) -> None:
        """The ledger (nothing is opened yet), its writer and the writer's lifetime service."""
        config = self.config
        settings = config.metering
        if ledger is None:
            ledger = open_ledger(ledger_url(config))
        spill = None
        if not isinstance(ledger, MemoryLedger):
            spill = SpillFile(settings.spill_path or default_spill_path(ledger))
        live = self.live

        def request_log(records: Any) -> None:
            if live.current.config.metering.request_log:
                log_records(records)

        self.ledger = ledger
        self.writer = LedgerWriter(
            ledger,
            flush_interval_s=settings.flush_interval_s,
            batch_size=settings.batch_size,
            max_buffered=settings.max_buffered,
            spill=spill,
            observers=[metrics_observer(live), request_log],
        )
        self.add_service(self._metering_service)

    def _setup_alerts(self) -> None:
        """The alert engine: it counts the writer's batches and runs for the gateway's life."""
        redis = self.redis
        store: AlertStore
        if redis is None:
            store = MemoryAlertStore()
        else:
            from tenantware.alerts.redis import RedisAlertStore

            store = RedisAlertStore(redis, prefix=self.config.gateway.redis_prefix)
        engine = AlertEngine(
            self.live,
            store,
            board=self.board,
            writer=self.writer,
            store_health=self.stores.health if redis is not None else None,
            quota_store=self.quota_store,
        )
        if self.writer is not None:
            self.writer.observers.append(engine.observe)
        self.alerts = engine
        self.add_service(self._alerts_service)

    @asynccontextmanager
    async def _alerts_service(self) -> AsyncIterator[None]:
        engine = self.alerts
        assert engine is not None
        processes = self.serving_processes()
        if self.redis is None and processes > 1:
            structlog.get_logger("tenantware.alerts").warning(
                "alerts without a shared store: each process judges its own traffic and "
                "sends its own alerts; set gateway.redis_url",
                processes=processes,
            )
        async with engine.running():
            yield

    @asynccontextmanager
    async def _registry_service(self) -> AsyncIterator[None]:
        try:
            async with self.registry.running():
                yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.registry_store.aclose()

    @asynccontextmanager
    async def _metering_service(self) -> AsyncIterator[None]:
        writer = self.writer
        assert writer is not None
        settings = self.config.metering
        redis = self.redis
        if settings.redis_stream and redis is not None:
            stream = self.config.gateway.redis_prefix + settings.redis_stream
            writer.publisher = RedisStreamPublisher(
                redis, stream, maxlen=settings.redis_stream_maxlen
            )
        async with writer.running():
            yield

    def serving_processes(self) -> int:
        """Processes or replicas sharing this configuration, whichever is more."""
        return max(self.processes, self.config.gateway.replicas)

    def _lease_s(self) -> float:
        return self.config.quota.lease_s

    @asynccontextmanager
    async def _tracing_service(self) -> AsyncIterator[None]:
        tracing = self.tracing
        assert tracing is not None
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                # The exporter sends what is still batched: a blocking call, off the loop.
                await anyio.to_thread.run_sync(tracing.shutdown)

    def add_service(self, service: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        """Run ``service()`` for the gateway's lifetime (entered in order, exited reversed)."""
        self._services.append(service)

    @property
    def redis(self) -> RedisClient | None:
        """The shared Redis client when ``gateway.redis_url`` is set (one pool per process)."""
        return self.stores.redis

    @property
    def quota_store(self) -> QuotaStore:
        """Redis (with the failure policies) when ``gateway.redis_url`` is set, else memory."""
        return self.stores.quota_store()

    @property
    def config(self) -> GatewayConfig:
        return self.live.current.config

    def middleware(self, *, admin: bool = True) -> list[Middleware]:
        """The stack, outermost first, for ``Starlette(middleware=...)``.

        FastAPI's ``add_middleware`` puts each call outermost, so add these in reverse there.
        With ``admin`` (the default) the first entry answers ``admin_app``'s paths
        (``/admin/``, ``/metrics``, ``/readyz``, ``/v1/usage``) outside the layers.
        """
        on_rejected = UsageRecorder(self.live, self.writer).record_rejected if self.writer else None
        # The tenant layer's own refusals count for the tenant's circuit (it sits outside the
        # breaker layer, so it hands them over).
        on_refusal = (
            TenantRefusals(live=self.live, board=self.board) if self.board.enabled else None
        )
        stack = [Middleware(AdminRoutes, admin_app=self.admin_app)] if admin else []
        if self.tracing is not None:
            stack.append(Middleware(TracingMiddleware, live=self.live, tracing=self.tracing))
        stack += [
            Middleware(
                TenantMiddleware,
                live=self.live,
                estimator=self.estimator,
                on_rejected=on_rejected,
                on_refusal=on_refusal,
            ),
            # -- request log (tenants that opted in) -------------------------------------
            Middleware(RequestLogMiddleware, store=self.log_store, keyring=self.keyring),
        ]
        # -- metering layer -------------------------------------------------------------
        if self.writer is not None:
            stack.append(Middleware(MeteringMiddleware, live=self.live, writer=self.writer))
        # -- response cache ---------------------------------------------------------------
        stack.append(
            Middleware(
                CacheMiddleware, live=self.live, store=self.cache_store, keyring=self.keyring
            )
        )
        # -- quota layer ----------------------------------------------------------------
        admission = self.config.admission.enabled
        stack.append(
            Middleware(
                QuotaMiddleware,
                live=self.live,
                store=self.quota_store,
                # On one Redis server the reservation also asks the admission layer's pool
                # for the seat: one round trip before the upstream instead of two.
                admission=self.admission if admission else None,
                joint=self.stores.joint() if admission else None,
            )
        )
        # -- admission layer ------------------------------------------------------------
        if admission:
            stack.append(Middleware(AdmissionMiddleware, live=self.live, pools=self.admission))
        # -- breaker layer --------------------------------------------------------------
        if self.board.enabled:
            stack.append(Middleware(BreakerMiddleware, live=self.live, board=self.board))
        return stack

    def wrap(self, app: ASGIApp, *, admin: bool = True) -> ASGIApp:
        """``app`` wrapped in the whole stack (the same order as ``middleware()``).

        With ``admin`` (the default) the paths of ``admin_app`` are answered by it, outside
        the layers, and every other request goes through them to ``app``.
        """
        for layer in reversed(self.middleware(admin=admin)):
            app = layer.cls(app, *layer.args, **layer.kwargs)
        return app

    @functools.cached_property
    def admin_app(self) -> ASGIApp:
        """The gateway's own routes, for a user's app as for ``tenantware serve``: the admin
        API (``/admin/``, with ``/admin/usage``), ``/metrics``, ``/readyz`` and a tenant's
        ``/v1/usage``. Other paths get 404. ``gateway.wrap(app)`` and
        ``gateway.middleware()`` include it.
        """
        reports = AdminApp(
            live=self.live,
            ledger=self.ledger,
            writer=self.writer,
            health={"registry": self.registry.status},
            checks=gateway_checks(self),
        )
        admin = AdminApi(
            live=self.live,
            store=self.registry_store,
            sync=self.registry,
            fallback=reports,
            processes=self.serving_processes(),
            audit_log=self.ledger if isinstance(self.ledger, AuditLog) else None,
            tenant_data=self.tenant_data,
            balances=self.balances,
            payments=self.payment_providers(),
            alerts=self.alerts,
            migration=self.migration,
        )
        reports.authorize = admin.may_read_reports
        tenant_usage = TenantMiddleware(reports, live=self.live, estimator=self.estimator)
        dashboard = self.dashboard_app()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope["path"] if scope["type"] == "http" else ""
            if path == HEALTH_PATH:
                await _alive(send)
            elif is_dashboard_path(path):
                await dashboard(scope, receive, send)
            elif path.startswith(ADMIN_PREFIX):
                await admin(scope, receive, send)
            elif path in TENANT_USAGE_PATHS:
                await tenant_usage(scope, receive, send)
            else:  # /metrics, /readyz, and the 404 of any other path
                await reports(scope, receive, send)

        return app

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Background work for the gateway's lifetime (config watch); closes clients after."""
        # The services are entered inside the task group and left before it, so a service
        # may run its own task group (cancel scopes must nest).
        async with anyio.create_task_group() as group:
            try:
                async with AsyncExitStack() as stack:
                    for service in self._services:
                        await stack.enter_async_context(service())
                    if self.config_path is not None:
                        group.start_soon(watch_config, self.live, self.config_path)
                    self.started, self.draining = True, False
                    try:
                        yield
                    finally:
                        self.draining = True
            finally:
                group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.aclose()

    async def aclose(self) -> None:
        """Close the upstream pool and the Redis client."""
        await self.proxy.aclose()
        with contextlib.suppress(Exception):
            await self.board.aclose()
        with contextlib.suppress(Exception):
            await self.cache_store.aclose()
        with contextlib.suppress(Exception):
            await self.log_store.aclose()
        await self.stores.aclose()

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[None]:
        """A Starlette/FastAPI ``lifespan=`` callable."""
        return self.running()

    def dashboard_app(self) -> DashboardApp:
        """The dashboard (``/dashboard`` and its JSON under ``/admin/dashboard/``), to route
        those paths to in an app of your own; ``admin_app`` (so ``wrap()``, ``middleware()``
        and ``asgi_app()``) includes it."""
        sources = LiveSources(
            live=self.live,
            board=self.board,
            pools=self.admission,
            stores=self.stores,
            writer=self.writer,
            registry=self.registry.status,
            migration=MigrationSource(
                self.migration.book, self.migration.report_rolled_back, self.migration.report
            ),
        )
        return DashboardApp(live=self.live, ledger=self.ledger, sources=sources)

    def asgi_app(self, *, extra: Callable[[Scope], ASGIApp | None] | None = None) -> ASGIApp:
        """The standalone gateway app: the proxy behind the stack, with lifespan handling.

        ``extra(scope)`` may return an app for paths the proxy does not serve (the demo
        mounts its fake upstream that way).
        """
        wrapped = self.wrap(self.proxy, admin=False)
        admin = self.admin_app
        gateway = self

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await _run_lifespan(gateway, receive, send)
                return
            if scope["type"] == "http":
                path = scope["path"]
                if is_admin_path(path):  # /healthz too: before any layer, even draining
                    await admin(scope, receive, send)
                    return
                if path == OPENAPI_PATH and scope["method"] == "GET":
                    await send_openapi(send)  # public: describes the API, holds no state
                    return
            if extra is not None:
                other = extra(scope)
                if other is not None:
                    await other(scope, receive, send)
                    return
            await wrapped(scope, receive, send)

        return app


def ledger_url(config: GatewayConfig) -> str:
    """The ledger URL ``config`` names (``${NAME}`` expanded), or the default SQLite file."""
    url = config.metering.ledger_url or config.gateway.ledger_url
    return expanded_url(url, "metering.ledger_url") or DEFAULT_LEDGER_URL


def is_admin_path(path: str) -> bool:
    """Whether ``path`` is one of ``Gateway.admin_app``'s."""
    return path.startswith(ADMIN_PREFIX) or path in _ADMIN_PATHS or is_dashboard_path(path)


#: Liveness: the process answers (``/readyz`` says whether it should get traffic).
HEALTH_PATH = "/healthz"
_ADMIN_PATHS = frozenset({"/metrics", READY_PATH, HEALTH_PATH, *TENANT_USAGE_PATHS})


class AdminRoutes:
    """``AdminRoutes(app, admin_app=...)``: the gateway's own paths to ``admin_app``, the rest
    to ``app`` (the first entry of ``Gateway.middleware()``)."""

    def __init__(self, app: ASGIApp, *, admin_app: ASGIApp) -> None:
        self.app = app
        self.admin_app = admin_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(scope["path"]):
            await self.admin_app(scope, receive, send)
            return
        await self.app(scope, receive, send)


_ALIVE_BODY = b'{"status":"ok"}'


async def _alive(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_ALIVE_BODY)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _ALIVE_BODY})


async def _run_lifespan(gateway: Gateway, receive: Receive, send: Send) -> None:
    """Run ``gateway.running()`` for the server's lifespan, reporting each phase's failure as
    that phase's, with the error itself (uvicorn prints it and exits on a failed startup)."""
    message = await receive()
    if message["type"] != "lifespan.startup":
        return
    started = False
    try:
        async with gateway.running():
            await send({"type": "lifespan.startup.complete"})
            started = True
            while (await receive())["type"] != "lifespan.shutdown":
                pass
    except Exception as exc:
        phase = "shutdown" if started else "startup"
        await send({"type": f"lifespan.{phase}.failed", "message": _describe(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})


def _describe(exc: BaseException) -> str:
    """``Type: text`` of the error, looking through the task group's one-error wrapper."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
