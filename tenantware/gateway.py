"""Assembles the middleware stack, the proxy and their lifecycle from one configuration.

The order of layers is fixed here, outermost first (tenant, metering, quota, admission,
breaker): each later layer relies on what the earlier ones put in the request context.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from starlette.middleware import Middleware

from tenantware.admission.pools import AdmissionPools
from tenantware.backends.redis_support import RedisClient, connect_redis
from tenantware.config import GatewayConfig
from tenantware.estimate import PromptEstimator, estimate_prompt_tokens
from tenantware.middleware.admission import AdmissionMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.proxy.app import ProxyApp
from tenantware.proxy.upstream import UpstreamClient
from tenantware.reload import watch_config
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Receive, Scope, Send

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
    ) -> None:
        self.live = LiveConfig(config)
        self.config_path = config_path
        self.estimator = estimator
        self.proxy = ProxyApp(live=self.live, client=upstream_client)
        #: Async context managers entered for the gateway's lifetime (writers, pools).
        self._services: list[Callable[[], AbstractAsyncContextManager[Any]]] = []
        self._redis: RedisClient | None = None
        #: Fair-share seat pools (memory, or Redis when ``gateway.redis_url`` is set).
        self.admission = AdmissionPools(
            config.admission,
            redis=self.redis,
            prefix=config.gateway.redis_prefix,
            on_failure=config.gateway.on_store_failure,
            replicas=config.gateway.replicas,
        )
        self.add_service(self.admission.running)
        self.live.on_change(lambda snapshot: self.admission.reconfigure(snapshot.config.admission))

    def add_service(self, service: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        """Run ``service()`` for the gateway's lifetime (entered in order, exited reversed)."""
        self._services.append(service)

    @property
    def redis(self) -> RedisClient | None:
        """The shared Redis client when ``gateway.redis_url`` is set (one pool per process)."""
        settings = self.config.gateway
        if self._redis is None and settings.redis_url:
            self._redis = connect_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
        return self._redis

    @property
    def config(self) -> GatewayConfig:
        return self.live.current.config

    def middleware(self) -> list[Middleware]:
        """The stack, outermost first, for ``Starlette(middleware=...)``.

        FastAPI's ``add_middleware`` puts each call outermost, so add these in reverse there.
        """
        stack = [Middleware(TenantMiddleware, live=self.live, estimator=self.estimator)]
        # -- metering layer -------------------------------------------------------------
        # -- quota layer ----------------------------------------------------------------
        # -- admission layer ------------------------------------------------------------
        if self.config.admission.enabled:
            stack.append(Middleware(AdmissionMiddleware, live=self.live, pools=self.admission))
        # -- breaker layer --------------------------------------------------------------
        return stack

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` wrapped in the whole stack (the same order as ``middleware()``)."""
        for layer in reversed(self.middleware()):
            app = layer.cls(app, *layer.args, **layer.kwargs)
        return app

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Background work for the gateway's lifetime (config watch); closes clients after."""
        # Services are entered inside the task group and exited before it: a service may run
        # its own task group (cancel scopes must nest).
        async with anyio.create_task_group() as group:
            try:
                async with AsyncExitStack() as stack:
                    for service in self._services:
                        await stack.enter_async_context(service())
                    if self.config_path is not None:
                        group.start_soon(watch_config, self.live, self.config_path)
                    yield
            finally:
                group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.aclose()

    async def aclose(self) -> None:
        """Close the upstream pool and the Redis client."""
        await self.proxy.aclose()
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

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

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await _run_lifespan(gateway, receive, send)
                return
            if extra is not None:
                other = extra(scope)
                if other is not None:
                    await other(scope, receive, send)
                    return
            await wrapped(scope, receive, send)

        return app


async def _run_lifespan(gateway: Gateway, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "lifespan.startup":
        return
    try:
        async with gateway.running():
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
    except Exception as exc:
        await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})
