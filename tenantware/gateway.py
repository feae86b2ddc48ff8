"""Assembles the middleware stack, the proxy and their lifecycle from one configuration.

The order of layers is fixed here, outermost first (tenant, metering, quota, admission,
breaker): each later layer relies on what the earlier ones put in the request context.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from starlette.middleware import Middleware

from tenantware.admin.app import AdminApi
from tenantware.admission.pools import AdmissionPools
from tenantware.breaker.board import BreakerBoard
from tenantware.config import GatewayConfig
from tenantware.estimate import PromptEstimator, estimate_prompt_tokens
from tenantware.metering.ledger import (
    DEFAULT_LEDGER_URL,
    AuditLog,
    Ledger,
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
from tenantware.middleware.metering import MeteringMiddleware, UsageRecorder
from tenantware.middleware.quota import QuotaMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.middleware.tracing import TracingMiddleware
from tenantware.proxy.app import ProxyApp
from tenantware.proxy.upstream import UpstreamClient
from tenantware.quota.store import QuotaStore
from tenantware.readiness import gateway_checks
from tenantware.registry.store import RegistryStore
from tenantware.registry.sync import RegistrySync
from tenantware.reload import watch_config
from tenantware.state import LiveConfig
from tenantware.stores import Stores, open_stores
from tenantware.tracing import Tracing, open_tracing
from tenantware.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from tenantware.backends.redis_support import RedisClient

__all__ = ["Gateway"]


class Gateway:
    """One gateway: live config, the stores behind each layer, the proxy app.

    ``gateway.middleware()`` gives the stack for ``Starlette(middleware=...)``;
    ``gateway.wrap(app)`` applies it to any ASGI app; ``gateway.asgi_app()`` is the standalone
    gateway (proxy under ``/v1``, ``/healthz``) that ``tenantware serve`` runs.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: str | os.PathLike[str] | None = None,
        upstream_client: UpstreamClient | None = None,
        estimator: PromptEstimator = estimate_prompt_tokens,
        ledger: Ledger | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.live = LiveConfig(config)
        self.config_path = config_path
        self.estimator = estimator
        settings = config.gateway
        #: Where every layer keeps its state: memory, or ``gateway.redis_url``.
        self.stores: Stores = open_stores(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            replicas=settings.replicas,
            on_failure=settings.on_store_failure or "local",
            probe_interval_s=config.quota.retry_store_after_s or settings.store_probe_interval_s,
        )
        #: Tenants and keys: the file's (in this process), or ``gateway.registry_url``'s.
        self.registry_store: RegistryStore = self.stores.registry_store(
            settings.registry_url, tenants=config.tenants
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
        self.proxy = ProxyApp(live=self.live, client=upstream_client, board=self.board)
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
        self.live.on_change(lambda snapshot: self.admission.reconfigure(snapshot.config.admission))
        self.ledger: Ledger | None = None
        self.writer: LedgerWriter | None = None
        if config.metering.enabled:
            self._setup_metering(ledger)

    def _setup_metering(self, ledger: Ledger | None) -> None:
        """The ledger (nothing is opened yet), its writer and the writer's lifetime service."""
        config = self.config
        settings = config.metering
        if ledger is None:
            ledger = open_ledger(
                settings.ledger_url or config.gateway.ledger_url or DEFAULT_LEDGER_URL
            )
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

    def middleware(self) -> list[Middleware]:
        """The stack, outermost first, for ``Starlette(middleware=...)``.

        FastAPI's ``add_middleware`` puts each call outermost, so add these in reverse there.
        """
        on_rejected = UsageRecorder(self.live, self.writer).record_rejected if self.writer else None
        # The tenant layer's own refusals count for the tenant's circuit (it sits outside the
        # breaker layer, so it hands them over).
        on_refusal = (
            TenantRefusals(live=self.live, board=self.board) if self.board.enabled else None
        )
        stack = (
            []
            if self.tracing is None
            else [Middleware(TracingMiddleware, live=self.live, tracing=self.tracing)]
        )
        stack += [
            Middleware(
                TenantMiddleware,
                live=self.live,
                estimator=self.estimator,
                on_rejected=on_rejected,
                on_refusal=on_refusal,
            )
        ]
        # -- metering layer -------------------------------------------------------------
        if self.writer is not None:
            stack.append(Middleware(MeteringMiddleware, live=self.live, writer=self.writer))
        # -- quota layer ----------------------------------------------------------------
        stack.append(Middleware(QuotaMiddleware, live=self.live, store=self.quota_store))
        # -- admission layer ------------------------------------------------------------
        if self.config.admission.enabled:
            stack.append(Middleware(AdmissionMiddleware, live=self.live, pools=self.admission))
        # -- breaker layer --------------------------------------------------------------
        if self.board.enabled:
            stack.append(Middleware(BreakerMiddleware, live=self.live, board=self.board))
        return stack

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` wrapped in the whole stack (the same order as ``middleware()``)."""
        for layer in reversed(self.middleware()):
            app = layer.cls(app, *layer.args, **layer.kwargs)
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
        await self.stores.aclose()

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[None]:
        """A Starlette/FastAPI ``lifespan=`` callable."""
        return self.running()

    def asgi_app(self, *, extra: Callable[[Scope], ASGIApp | None] | None = None) -> ASGIApp:
        """The standalone gateway app: the proxy behind the stack, with lifespan handling.

        ``extra(scope)`` may return an app for paths the proxy does not serve (the demo
        mounts its fake upstream that way).
        """
        wrapped = self.wrap(self.proxy)
        gateway = self
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
            processes=max(self.processes, self.config.gateway.replicas),
            audit_log=self.ledger if isinstance(self.ledger, AuditLog) else None,
        )
        reports.authorize = admin.may_read_reports
        tenant_usage = TenantMiddleware(reports, live=self.live, estimator=self.estimator)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await _run_lifespan(gateway, receive, send)
                return
            if scope["type"] == "http":
                path = scope["path"]
                if path == HEALTH_PATH:  # alive: answered before any layer, even draining
                    await _alive(send)
                    return
                if path.startswith(ADMIN_PREFIX):
                    await admin(scope, receive, send)
                    return
                if path in ("/metrics", READY_PATH):
                    await reports(scope, receive, send)
                    return
                if path in TENANT_USAGE_PATHS:
                    await tenant_usage(scope, receive, send)
                    return
            if extra is not None:
                other = extra(scope)
                if other is not None:
                    await other(scope, receive, send)
                    return
            await wrapped(scope, receive, send)

        return app


#: Liveness: the process answers (``/readyz`` says whether it should get traffic).
HEALTH_PATH = "/healthz"
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
