"""The bundled OpenAI-compatible proxy: an ASGI app behind the tenantware middlewares.

It relies on the request context (tenant, decoded body view, canonical model) that
``TenantMiddleware`` built, picks the upstream for the model, forwards the original body
(re-encoded only when the model name or ``stream_options`` must change) and relays the answer:
JSON whole, SSE event by event with nothing buffered beyond an incomplete event.
"""

from __future__ import annotations

import time
from typing import Any, Final

import anyio
import msgspec
import structlog

from tenantware.config import Upstream
from tenantware.context import Outcome, RequestContext, Usage, get_context
from tenantware.errors import GatewayError, send_error
from tenantware.proxy.upstream import (
    AiohttpUpstreamClient,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tenantware.state import LiveConfig, Snapshot
from tenantware.types import Message, Receive, Scope, Send
from tenantware.usage import StreamTap, parse_json_usage

__all__ = ["ProxyApp"]

log = structlog.get_logger("tenantware.proxy")

_JSON_CT: Final = (b"content-type", b"application/json")
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class _Model(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "tenantware"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


class _Target:
    """An upstream's URL base and request headers, built once per config version."""

    __slots__ = ("base_url", "headers", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.base_url = upstream.base_url.rstrip("/")
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        headers.update(upstream.headers)
        key = upstream.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.headers = headers


def _model_required() -> GatewayError:
    return GatewayError(
        400, "you must provide a model parameter", param="model", outcome=Outcome.REJECTED_REQUEST
    )


class ProxyApp:
    """``ProxyApp(live=..., client=AiohttpUpstreamClient())``: mount it under the API prefix."""

    def __init__(self, *, live: LiveConfig, client: UpstreamClient | None = None) -> None:
        self.live = live
        self.client: UpstreamClient = client or AiohttpUpstreamClient()
        self._targets: dict[str, _Target] = {}
        self._targets_version = -1
        self._routes = {
            ("POST", "/chat/completions"): self._chat_completions,
            ("POST", "/completions"): self._completions,
            ("POST", "/embeddings"): self._embeddings,
            ("GET", "/models"): self._models,
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
        if path.startswith("/v1/"):
            path = path[3:]
        handler = self._routes.get((scope["method"], path))
        ctx = get_context(scope)
        try:
            if handler is None:
                raise GatewayError(
                    404,
                    f"Unknown request URL: {scope['method']} {scope['path']}.",
                    code="unknown_url",
                )
            await handler(ctx, receive, send)
        except GatewayError as error:
            if ctx.response_started:
                raise
            await error.send(send, ctx)

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
        view = ctx.view
        if view is None or view.model is None:
            raise _model_required()
        if not view.prompt or bytes(view.prompt) == b"null":
            raise GatewayError(400, "'prompt' is a required property.", param="prompt")
        await self._forward(ctx, receive, send, "/completions")

    async def _embeddings(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        view = ctx.view
        if view is None or view.model is None:
            raise _model_required()
        if not view.input or bytes(view.input) == b"null":
            raise GatewayError(400, "'input' is a required property.", param="input")
        await self._forward(ctx, receive, send, "/embeddings")

    # -- forwarding -----------------------------------------------------------------------

    def _target(self, snapshot: Snapshot, model: str) -> _Target:
        if self._targets_version != snapshot.version:
            self._targets = {u.name: _Target(u) for u in snapshot.config.upstreams}
            self._targets_version = snapshot.version
        upstreams = snapshot.routes.get(model)
        if not upstreams:
            raise GatewayError(
                503,
                f"No upstream is configured for the model `{model}`.",
                type="server_error",
                code="model_unavailable",
                outcome=Outcome.UPSTREAM_ERROR,
            )
        return self._targets[upstreams[0].name]

    async def _forward(self, ctx: RequestContext, receive: Receive, send: Send, path: str) -> None:
        view = ctx.view
        assert view is not None
        assert ctx.model is not None
        snapshot = self.live.current
        target = self._target(snapshot, ctx.model)
        spec = snapshot.catalogue.models.get(ctx.model)
        upstream_model = (spec.upstream_name if spec and spec.upstream_name else None) or ctx.model
        streaming = view.stream
        wants_usage = bool(view.stream_options and view.stream_options.include_usage)
        body = ctx.body
        if upstream_model != view.model or (streaming and not wants_usage):
            body = _rewrite(body, upstream_model, add_stream_usage=streaming and not wants_usage)
        headers = target.headers
        headers = {**headers, "x-request-id": ctx.request_id}
        ctx.upstream = target.upstream.name
        ctx.model_served = ctx.model
        started = time.perf_counter()
        try:
            response = await self.client.request(
                "POST",
                target.base_url + path,
                headers=headers,
                body=body,
                timeout_s=target.upstream.timeout_s,
                connect_timeout_s=target.upstream.connect_timeout_s,
            )
        except UpstreamUnavailable as exc:
            raise _unavailable(exc, target) from None
        try:
            if response.status >= 400 or not streaming:
                await self._relay_whole(ctx, response, send, started)
            else:
                await self._relay_stream(
                    ctx, response, receive, send, started, hide_usage=not wants_usage
                )
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay_whole(
        self, ctx: RequestContext, response: UpstreamResponse, send: Send, started: float
    ) -> None:
        try:
            data = await response.read()
        except UpstreamUnavailable as exc:
            raise _unavailable(exc, None) from None
        ctx.upstream_latency_s = time.perf_counter() - started
        status = response.status
        if status < 400:
            usage, _model = parse_json_usage(data)
            ctx.usage = usage
            ctx.outcome = Outcome.OK
        else:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            # An upstream error produced no tokens; its body is relayed as the client's answer.
            ctx.usage = Usage()
            if not data.startswith(b"{"):
                await send_error(
                    send,
                    status,
                    f"The upstream answered {status}.",
                    type="server_error" if status >= 500 else "invalid_request_error",
                    code="upstream_error",
                    ctx=ctx,
                    outcome=Outcome.UPSTREAM_ERROR,
                    headers=[h for h in response.headers if h[0] != b"content-type"],
                )
                return
        headers = [h for h in response.headers if h[0] != b"content-type"]
        headers.append(_JSON_CT)
        headers.append((b"content-length", str(len(data)).encode()))
        ctx.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _relay_stream(
        self,
        ctx: RequestContext,
        response: UpstreamResponse,
        receive: Receive,
        send: Send,
        started: float,
        *,
        hide_usage: bool,
    ) -> None:
        tap = StreamTap(hide_usage=hide_usage)
        disconnected = finished = False
        watching = True
        failed: UpstreamUnavailable | None = None

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            nonlocal disconnected, watching
            try:
                while True:
                    message: Message = await receive()
                    if message["type"] == "http.disconnect":
                        if not finished:
                            disconnected = True
                            cancel.cancel()
                        return
            finally:
                watching = False

        # The relay runs in this task; only the disconnect watcher is a task of its own.
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch_disconnect, group.cancel_scope)
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": _SSE_HEADERS,
                    }
                )
                try:
                    async for chunk in response.chunks():
                        if ctx.first_byte_at is None:
                            ctx.first_byte_at = time.perf_counter()
                        out = tap.feed(chunk)
                        if out:
                            await send(
                                {"type": "http.response.body", "body": out, "more_body": True}
                            )
                    rest = tap.flush()
                    if rest:
                        await send({"type": "http.response.body", "body": rest, "more_body": True})
                except UpstreamUnavailable as exc:
                    failed = exc
                    await send(
                        {
                            "type": "http.response.body",
                            "body": _stream_error_event(exc),
                            "more_body": True,
                        }
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
                # Servers like uvicorn answer a pending receive() with http.disconnect once the
                # response is complete: let the watcher end by itself. Cancelling it costs a
                # cancellation round and leaves cyclic garbage (frames, tracebacks) for the GC.
                await anyio.lowlevel.checkpoint()
                if watching:
                    group.cancel_scope.cancel()
        except* OSError:
            # The server could not write to the client: it is gone.
            disconnected = True
        ctx.upstream_latency_s = time.perf_counter() - started
        if tap.usage is not None:
            ctx.usage = tap.usage
        else:
            ctx.usage = Usage(
                input_tokens=ctx.estimated_prompt_tokens,
                output_tokens=tap.estimated_output_tokens(),
                estimated=True,
            )
        if tap.model:
            ctx.model_served = ctx.model_served or tap.model
        if disconnected:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
        elif failed is not None:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            log.warning("upstream stream broke", upstream=ctx.upstream, error=type(failed).__name__)
        else:
            ctx.outcome = Outcome.OK


def _rewrite(body: bytes, model: str, *, add_stream_usage: bool) -> bytes:
    """The body with the upstream's model name and, for streams, usage reporting switched on."""
    data: dict[str, Any] = _decode_any(body)
    data["model"] = model
    if add_stream_usage:
        options = data.get("stream_options")
        data["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return _encode(data)


def _unavailable(exc: UpstreamUnavailable, target: _Target | None) -> GatewayError:
    name = f" `{target.upstream.name}`" if target else ""
    if isinstance(exc, UpstreamTimeout):
        return GatewayError(
            504,
            f"The upstream{name} did not answer in time.",
            type="server_error",
            code="upstream_timeout",
            outcome=Outcome.UPSTREAM_TIMEOUT,
            should_retry=True,
        )
    return GatewayError(
        502,
        f"The upstream{name} could not be reached.",
        type="server_error",
        code="upstream_unreachable",
        outcome=Outcome.UPSTREAM_ERROR,
        should_retry=True,
    )


def _stream_error_event(exc: UpstreamUnavailable) -> bytes:
    message = (
        "The upstream stream was interrupted."
        if not isinstance(exc, UpstreamTimeout)
        else ("The upstream stopped sending in time.")
    )
    body = _encode(
        {
            "error": {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "upstream_error",
            }
        }
    )
    return b"data: " + body + b"\n\n"


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_CT, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
