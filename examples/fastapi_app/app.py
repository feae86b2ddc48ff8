"""The same gateway on FastAPI, and the one pitfall: ``add_middleware`` order.

FastAPI's (and Starlette's) ``app.add_middleware`` inserts each new middleware *outermost*.
Calling it in the stack's order would put the tenant layer innermost, where no other layer
can see the tenant. So add the stack in reverse (or pass ``middleware=`` to the constructor).

Run: ``uvicorn examples.fastapi_app.app:app`` (same environment as the Starlette example).
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request

from tenantware import Gateway, get_context, load_config
from tenantware.demo import demo_config


def build_gateway() -> Gateway:
    path = os.environ.get("TENANTWARE_CONFIG")
    if path:
        return Gateway(load_config(path), config_path=path)
    upstream = os.environ.get("TENANTWARE_UPSTREAM", "http://127.0.0.1:9000/v1")
    return Gateway(demo_config(upstream))


def create_app(gateway: Gateway | None = None) -> FastAPI:
    gateway = gateway or build_gateway()
    app = FastAPI(lifespan=gateway.lifespan)

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"service": "my-fastapi-app", "gateway": "/v1"}

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        ctx = get_context(request.scope)
        assert ctx.tenant is not None
        return {"tenant": ctx.tenant.id, "tier": ctx.tenant.tier, "request_id": ctx.request_id}

    app.mount("/v1", gateway.proxy)
    # Reverse: the last add_middleware call becomes the outermost layer.
    for layer in reversed(gateway.middleware()):
        app.add_middleware(layer.cls, *layer.args, **layer.kwargs)
    return app


app = create_app()
