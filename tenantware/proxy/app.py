"""The bundled OpenAI-compatible proxy: an ASGI app behind the tenantware middlewares.

It relies on the request context (tenant, decoded body view, canonical model) that
``TenantMiddleware`` built, checks the request the route needs, and hands it to the
``Dispatcher`` (``proxy/dispatch.py``: the retry and fallback loop over deployments), which
forwards the original body (re-encoded only when the model name or ``stream_options`` must
change) and has the ``Relay`` (``proxy/relay.py``) send the answer: JSON whole, SSE event by
event with nothing buffered beyond an incomplete event.
"""

from __future__ import annotations

import msgspec
import structlog

from tenantware.breaker.board import RECORDED, BreakerBoard
from tenantware.context import Outcome, RequestContext, RequestView, get_context
from tenantware.errors import GatewayError, internal_error
from tenantware.ownership import OwnerStore
from tenantware.proxy.dispatch import CLIENT_HEADERS, Dispatcher
from tenantware.proxy.fast_path import FastPathUpstreamClient
from tenantware.proxy.migration import SESSION, MigrationRunner
from tenantware.proxy.openapi import OPENAPI_PATH, openapi_document
from tenantware.proxy.relay import JSON_CONTENT_TYPE, MODEL_SERVED_HEADER, Relay
from tenantware.proxy.stored import StoredResponses
from tenantware.proxy.upstream import AiohttpUpstreamClient, UpstreamClient
from tenantware.state import LiveConfig
from tenantware.types import Receive, Scope, Send

__all__ = ["MODEL_SERVED_HEADER", "RECORDED", "ProxyApp", "send_openapi"]

log = structlog.get_logger("tenantware.proxy")

_encode = msgspec.json.Encoder().encode


class _Model(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "tenantware"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


def _needs_key() -> GatewayError:
    return GatewayError(
        401,
        "This URL needs an API key: call the API under its prefix (/v1/) with "
        "'Authorization: Bearer <key>'.",
        code="invalid_api_key",
        outcome=Outcome.REJECTED_AUTH,
    )


def _model_required() -> GatewayError:
    return GatewayError(
        400, "you must provide a model parameter", param="model", outcome=Outcome.REJECTED_REQUEST
    )


def _require(view: RequestView | None, field: str) -> None:
    """The model and a JSON field the endpoint needs (present and not ``null``)."""
    if view is None or view.model is None:
        raise _model_required()
    raw: msgspec.Raw = getattr(view, field)
    if not raw or bytes(raw) == b"null":
        raise GatewayError(400, f"'{field}' is a required property.", param=field)


class ProxyApp:
    """``ProxyApp(live=..., client=...)``: mount it under the API prefix. Without a client:
    the fast path for plain ``http://`` upstreams, or aiohttp for all when
    ``gateway.upstream_fast_path`` is off."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        client: UpstreamClient | None = None,
        board: BreakerBoard | None = None,
        owners: OwnerStore | None = None,
        migration: MigrationRunner | None = None,
    ) -> None:
        self.live = live
        if client is None:
            fast = live.current.config.gateway.upstream_fast_path
            client = FastPathUpstreamClient() if fast else AiohttpUpstreamClient()
        self.client: UpstreamClient = client
        #: Circuits, shared with ``BreakerMiddleware`` when the gateway builds both.
        self.board = board or BreakerBoard(live.current.config.breaker)
        self.dispatcher = Dispatcher(live, self.client, self.board, Relay(), owners)
        #: Canary splits and shadow traffic (``[migration]``).
        self.migration = migration or MigrationRunner(live)
        self.migration.dispatcher = self.dispatcher
        self.dispatcher.migration = self.migration
        #: ``GET``/``DELETE /v1/responses/{id}`` for the tenant that created the response.
        self.stored = StoredResponses(self.dispatcher, self.dispatcher.owners)
        self.router = self.dispatcher.router
        self._forward = self.dispatcher.forward
        self._routes = {
            ("POST", "/chat/completions"): self._chat_completions,
            ("POST", "/completions"): self._completions,
            ("POST", "/embeddings"): self._embeddings,
            ("GET", "/models"): self._models,
            ("POST", "/messages"): self._messages,
            ("POST", "/messages/count_tokens"): self._count_tokens,
            ("POST", "/responses"): self._responses,
        }

    async def aclose(self) -> None:
        """Close the pooled upstream client (called on lifespan shutdown)."""
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path == "/healthz" or path == "/v1/healthz":
            await _send_json(send, 200, b'{"status":"ok"}')
            return
        if path == OPENAPI_PATH and scope["method"] == "GET":
            await send_openapi(send)
            return
        if path.startswith("/v1/"):
            path = path[3:]
        method = scope["method"]
        handler = self._routes.get((method, path))
        ctx = get_context(scope)
        migration = self.live.current.config.migration
        if migration.rules:
            # The canary's sticky key: the client's session, when it names one.
            header = migration.session_header.lower().encode("latin-1")
            for name, value in scope["headers"]:
                if name == header:
                    ctx.extra[SESSION] = value.decode("latin-1")
                    break
        try:
            if handler is None and self.stored.serves(method, path):
                if ctx.tenant is None:
                    raise _needs_key()
                await self.stored(ctx, send, method, path, scope.get("query_string", b""))
                return
            if handler is None:
                raise GatewayError(
                    404,
                    f"Unknown request URL: {scope['method']} {scope['path']}.",
                    code="unknown_url",
                )
            if ctx.tenant is None:
                # A path outside the API prefixes: the tenant layer checked no key, and every
                # route here lists models or reaches an upstream.
                raise _needs_key()
            if ctx.wire_format == "anthropic":
                ctx.extra[CLIENT_HEADERS] = [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in scope["headers"]
                    if name in _ANTHROPIC_HEADERS
                ]
            await handler(ctx, receive, send)
        except GatewayError as error:
            if ctx.response_started:
                raise
            await error.send(send, ctx)
        except Exception:
            # A stray exception (a bug): logged here with its traceback, answered with an
            # OpenAI-shaped 500 when nothing was sent yet (else the server must cut the
            # connection: the response cannot be finished).
            if ctx.response_started:
                raise
            log.exception("proxy failed", model=ctx.model, upstream=ctx.upstream)
            await internal_error().send(send, ctx)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routes ---------------------------------------------------------------------------

    async def _models(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        snapshot = self.live.current
        tenant = ctx.tenant
        names = sorted(name for name in snapshot.routes if tenant is None or tenant.may_use(name))
        body = _encode(_ModelList(data=[_Model(id=name) for name in names]))
        ctx.outcome = Outcome.OK
        await _send_json(send, 200, body)

    async def _chat_completions(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        view = ctx.view
        if view is None:
            raise GatewayError(400, "The request body must be a JSON chat completion request.")
        if view.model is None:
            raise _model_required()
        if not view.messages:
            raise GatewayError(
                400, "'messages' is a required property and must not be empty.", param="messages"
            )
        await self._forward(ctx, receive, send, "/chat/completions")

    async def _completions(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        _require(ctx.view, "prompt")
        await self._forward(ctx, receive, send, "/completions")

    async def _embeddings(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        _require(ctx.view, "input")
        await self._forward(ctx, receive, send, "/embeddings")

    async def _messages(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        """Anthropic's Messages API: relayed to Anthropic upstreams, translated for others."""
        view = ctx.view
        if view is None:
            raise GatewayError(400, "The request body must be a JSON Messages API request.")
        if view.model is None:
            raise _model_required()
        if view.max_tokens is None:
            raise GatewayError(400, "max_tokens: Field required", param="max_tokens")
        if not view.messages:
            raise GatewayError(400, "messages: at least one message is required", param="messages")
        await self._forward(ctx, receive, send, "/messages")

    async def _responses(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        """OpenAI's Responses API: translated to chat completions for the upstream."""
        _require(ctx.view, "input")
        await self._forward(ctx, receive, send, "/responses")

    async def _count_tokens(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        """Answered here by the gateway's prompt estimator (the one quotas reserve with), not
        by an upstream: an estimate, not the model's tokenizer."""
        view = ctx.view
        if view is None or view.model is None:
            raise _model_required()
        ctx.outcome = Outcome.OK
        body = b'{"input_tokens":%d}' % ctx.estimated_prompt_tokens
        await _send_json(send, 200, body)


#: Request headers passed on to Anthropic upstreams (the API version and beta features).
_ANTHROPIC_HEADERS = frozenset({b"anthropic-version", b"anthropic-beta"})


async def send_openapi(send: Send) -> None:
    """The proxy's OpenAPI document (``proxy/openapi.py``)."""
    await _send_json(send, 200, openapi_document())


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
