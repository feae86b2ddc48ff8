"""An ordinary Starlette app with its own routes, made a multi-tenant gateway by tenantware.

Run: ``TENANTWARE_CONFIG=tenantware.toml uvicorn examples.starlette_app.app:app``.
Without ``TENANTWARE_CONFIG`` it serves the demo tenants (keys ``sk-demo-acme``,
``sk-demo-hobby``) against the upstream at ``TENANTWARE_UPSTREAM`` (default: a fake upstream
started with ``python -m tenantware.testing.upstream --port 9000``).
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from tenantware import Gateway, get_context, load_config
from tenantware.demo import demo_config


def build_gateway() -> Gateway:
    path = os.environ.get("TENANTWARE_CONFIG")
    if path:
        return Gateway(load_config(path), config_path=path)
    upstream = os.environ.get("TENANTWARE_UPSTREAM", "http://127.0.0.1:9000/v1")
    return Gateway(demo_config(upstream))


async def home(request: Request) -> JSONResponse:
    """A route of the app itself: outside the API prefix, so no key is needed."""
    return JSONResponse({"service": "my-app", "gateway": "/v1"})


async def whoami(request: Request) -> JSONResponse:
    """A route of the app under the API prefix: tenantware has resolved the caller."""
    ctx = get_context(request.scope)
    tenant = ctx.tenant
    assert tenant is not None
    return JSONResponse({"tenant": tenant.id, "tier": tenant.tier, "request_id": ctx.request_id})


def create_app(gateway: Gateway | None = None) -> Starlette:
    gateway = gateway or build_gateway()
    return Starlette(
        routes=[
            Route("/", home),
            Route("/v1/whoami", whoami),
            Mount("/v1", app=gateway.proxy),
        ],
        # Outermost first: Starlette applies this list as written.
        middleware=gateway.middleware(),
        lifespan=gateway.lifespan,
    )


app = create_app()
