"""The bundled OpenAI-compatible proxy: an ASGI app behind the tenantware middlewares.

It relies on the request context (tenant, decoded body view, canonical model) that
``TenantMiddleware`` built, picks the upstream for the model, forwards the original body
(re-encoded only when the model name or ``stream_options`` must change) and relays the answer:
JSON whole, SSE event by event with nothing buffered beyond an incomplete event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import msgspec
import structlog

from tenantware.breaker.board import RECORDED, BreakerBoard, Deployment, circuit_open
from tenantware.breaker.circuit import FAILURE, LIMITED, RELEASE, SLOW, SUCCESS
from tenantware.config import Upstream
from tenantware.context import Outcome, RequestContext, Usage, get_context
from tenantware.errors import GatewayError, circuit_open_error, internal_error, send_error
from tenantware.metering.usage import StreamTap, parse_json_usage
from tenantware.proxy.routing import Router
from tenantware.proxy.upstream import (
    AiohttpUpstreamClient,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tenantware.state import LiveConfig, Snapshot
from tenantware.types import Message, Receive, Scope, Send

__all__ = ["MODEL_SERVED_HEADER", "RECORDED", "ProxyApp"]

#: Response header naming the model that answered (differs from the request after a fallback).
MODEL_SERVED_HEADER: Final = b"x-tenantware-model"

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

    def __init__(
        self,
        *,
        live: LiveConfig,
        client: UpstreamClient | None = None,
        board: BreakerBoard | None = None,
    ) -> None:
        self.live = live
        self.client: UpstreamClient = client or AiohttpUpstreamClient()
        #: Circuits, shared with ``BreakerMiddleware`` when the gateway builds both.
        self.board = board or BreakerBoard(live.current.config.breaker)
        self.router = Router(self.board)
        self._served_headers: dict[str, tuple[bytes, bytes]] = {}
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

    def _target(self, snapshot: Snapshot, upstream: Upstream) -> _Target:
        if self._targets_version != snapshot.version:
            self._targets = {u.name: _Target(u) for u in snapshot.config.upstreams}
            self._targets_version = snapshot.version
        return self._targets[upstream.name]

    async def _forward(self, ctx: RequestContext, receive: Receive, send: Send, path: str) -> None:
        """Try deployments (and fallback models) until one answers or retries run out.

        A call is re-tried elsewhere (or, after a full-jitter backoff, on a deployment already
        tried) only when nothing was sent to the client yet: connection errors, timeouts, 5xx
        and 429. Other answers, and every stream once it started, go to the client as they are.
        """
        assert ctx.model is not None
        snapshot = self.live.current
        board = self.board
        router = self.router
        model = ctx.model
        if not snapshot.routes.get(model):
            raise GatewayError(
                503,
                f"No upstream is configured for the model `{model}`.",
                type="server_error",
                code="model_unavailable",
                outcome=Outcome.UPSTREAM_ERROR,
            )
        chain = board.chain(snapshot, model, ctx.tenant)
        if board.remote:
            await board.refresh_chain(snapshot, chain)
        ctx.extra[RECORDED] = True
        settings = board.settings
        started = time.perf_counter()
        deadline = started + settings.retry_deadline_s
        tried: set[str] | None = None
        last: _Failed | None = None
        attempts = 0
        while True:
            pick = await router.pick(snapshot, chain, tried)
            deployment = pick.deployment
            if deployment is None:
                wait = max(pick.wait_s, 0.01)
                if (
                    last is None
                    or attempts >= settings.max_attempts
                    or time.perf_counter() + wait >= deadline
                ):
                    break
                # Only cooling (429) or open deployments left: wait for the first to return.
                await anyio.sleep(wait)
                continue
            if tried is not None and deployment.key in tried:
                delay = router.backoff(attempts - 1)
                if time.perf_counter() + delay >= deadline:
                    if pick.probe:
                        await board.release(deployment.key)
                    break
                await anyio.sleep(delay)
            attempts += 1
            last = await self._attempt(
                ctx, receive, send, path, snapshot, deployment, pick.probe, started
            )
            if last is None:
                return
            if tried is None:
                tried = set()
            tried.add(deployment.key)
            if attempts >= settings.max_attempts or time.perf_counter() >= deadline:
                break
        if last is None:
            raise circuit_open_error(circuit_open(model, pick.wait_s))
        if last.error is not None:
            raise _unavailable(last.error, last.target)
        ctx.usage = Usage()
        await self._send_whole(ctx, send, last.status, last.headers, last.data, last.served)

    async def _attempt(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        path: str,
        snapshot: Snapshot,
        deployment: Deployment,
        probe: bool,
        started: float,
    ) -> _Failed | None:
        """One upstream call; ``None`` when the answer went to the client."""
        view = ctx.view
        assert view is not None
        assert deployment.upstream is not None
        board = self.board
        key = deployment.key
        target = self._target(snapshot, deployment.upstream)
        served = deployment.model
        spec = snapshot.catalogue.models.get(served)
        upstream_model = (spec.upstream_name if spec and spec.upstream_name else None) or served
        streaming = view.stream
        wants_usage = bool(view.stream_options and view.stream_options.include_usage)
        body = ctx.body
        if upstream_model != view.model or (streaming and not wants_usage):
            body = _rewrite(body, upstream_model, add_stream_usage=streaming and not wants_usage)
        headers = {**target.headers, "x-request-id": ctx.request_id}
        ctx.upstream = target.upstream.name
        ctx.model_served = served
        inflight = board.inflight
        inflight[key] = inflight.get(key, 0) + 1
        outcome = RELEASE
        cool_s = 0.0
        try:
            called = time.perf_counter()
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
                outcome = FAILURE
                return _Failed(error=exc, target=target)
            try:
                status = response.status
                if status == 429 or status >= 500:
                    outcome = FAILURE
                    if status == 429:
                        outcome = LIMITED
                        cool_s = self._cooldown(response)
                    try:
                        data = await response.read()
                    except UpstreamUnavailable as exc:
                        return _Failed(error=exc, target=target)
                    ctx.upstream_latency_s = time.perf_counter() - started
                    return _Failed(
                        status=status, headers=response.headers, data=data, served=served
                    )
                slow = time.perf_counter() - called > board.deployment_policy.slow_call_s
                if status >= 400 or not streaming:
                    outcome = SLOW if slow else SUCCESS
                    try:
                        data = await response.read()
                    except UpstreamUnavailable as exc:
                        outcome = FAILURE
                        return _Failed(error=exc, target=target)
                    ctx.upstream_latency_s = time.perf_counter() - started
                    if status < 400:
                        usage, _model = parse_json_usage(data)
                        ctx.usage = usage
                    else:
                        ctx.usage = Usage()
                    await self._send_whole(ctx, send, status, response.headers, data, served)
                    return None
                await self._relay_stream(
                    ctx, response, receive, send, started, hide_usage=not wants_usage
                )
                broke = ctx.outcome == Outcome.UPSTREAM_ERROR
                outcome = FAILURE if broke else SLOW if slow else SUCCESS
                return None
            finally:
                close_now = getattr(response, "close_now", None)
                if close_now is not None:
                    # Synchronous (aiohttp): no await, so a cancellation cannot cut it short
                    # and the cancel scope a shield costs per request is not needed.
                    close_now()
                else:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
        finally:
            inflight[key] -= 1
            if outcome != RELEASE or probe:
                if board.remote:
                    with anyio.CancelScope(shield=True):
                        await board.record(key, outcome, probe=probe, cool_s=cool_s)
                else:  # the memory store never yields: nothing to shield
                    await board.record(key, outcome, probe=probe, cool_s=cool_s)

    def _cooldown(self, response: UpstreamResponse) -> float:
        """How long a 429 cools its deployment: the upstream's ``retry-after`` (capped)."""
        settings = self.board.settings
        seconds: float | None = None
        raw_ms = response.header("retry-after-ms")
        raw = response.header("retry-after")
        try:
            if raw_ms is not None:
                seconds = float(raw_ms) / 1000
            elif raw is not None:
                seconds = float(raw)
        except ValueError:
            seconds = None
        if seconds is None or not seconds > 0:
            return settings.default_cooldown_s
        return min(seconds, settings.max_cooldown_s)

    async def _send_whole(
        self,
        ctx: RequestContext,
        send: Send,
        status: int,
        upstream_headers: list[tuple[bytes, bytes]],
        data: bytes,
        served: str,
    ) -> None:
        """Relay a whole upstream answer; a non-JSON error becomes an OpenAI-shaped one."""
        if status < 400:
            ctx.outcome = Outcome.OK
        else:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            if not data.startswith(b"{"):
                await send_error(
                    send,
                    status,
                    f"The upstream answered {status}.",
                    type="server_error" if status >= 500 else "invalid_request_error",
                    code="upstream_error",
                    ctx=ctx,
                    outcome=Outcome.UPSTREAM_ERROR,
                    headers=[
                        *(h for h in upstream_headers if h[0] != b"content-type"),
                        self._served_header(served),
                    ],
                )
                return
        headers = [h for h in upstream_headers if h[0] != b"content-type"]
        headers.append(_JSON_CT)
        headers.append((b"content-length", str(len(data)).encode()))
        headers.append(self._served_header(served))
        ctx.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _served_header(self, model: str) -> tuple[bytes, bytes]:
        header = self._served_headers.get(model)
        if header is None:
            header = self._served_headers[model] = (MODEL_SERVED_HEADER, model.encode())
        return header

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
        failed: UpstreamUnavailable | None = None
        served_header = self._served_header(ctx.model_served or "")

        async def relay(watch: _Watch) -> None:
            nonlocal failed
            headers = [*_SSE_HEADERS, served_header]
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            read = _chunk_reader(response)
            feed = tap.feed
            try:
                while chunk := await read():
                    if ctx.first_byte_at is None:
                        ctx.first_byte_at = time.perf_counter()
                    out = feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
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
            # A disconnect reported after the last byte is the normal end, not a client
            # gone mid-stream (in-process transports report it during this last send).
            watch.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            disconnected = await _while_watching(receive, relay)
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


class _Watch:
    """What the disconnect watcher and the relay it watches tell each other."""

    __slots__ = ("cut", "disconnected", "finished")

    def __init__(self) -> None:
        #: The client left before the relay finished.
        self.disconnected = False
        #: The relay sent its last byte: a disconnect now is the normal end.
        self.finished = False
        #: The watcher cancelled the relay (the client left, or ``receive`` failed).
        self.cut = False


async def _watch_disconnect(receive: Receive, watch: _Watch, cancel: Callable[[], Any]) -> None:
    """Call ``cancel`` when the client leaves before the relay finished.

    uvicorn's ``send`` stays silent after a disconnect: only ``receive`` tells.
    """
    try:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                if not watch.finished:
                    watch.disconnected = watch.cut = True
                    cancel()
                return
    except Exception:
        if not watch.finished:
            watch.cut = True
            cancel()
        raise


def _chunk_reader(response: UpstreamResponse) -> Callable[[], Awaitable[bytes]]:
    """``await read()`` gives the next bytes of ``response``, ``b""`` at the end."""
    read: Callable[[], Awaitable[bytes]] | None = getattr(response, "read_chunk", None)
    if read is not None:
        return read
    chunks = response.chunks().__aiter__()

    async def read_next() -> bytes:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""

    return read_next


def _asyncio_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread (trio)
        return None


async def _while_watching(receive: Receive, relay: Callable[[_Watch], Awaitable[None]]) -> bool:
    """Run ``relay`` while watching the client; ``True`` if it left (and the relay was cut).

    On asyncio the watcher is one plain task that cancels the relaying task natively, the way
    ``asyncio.timeout`` does (``uncancel`` tells its cancellation from any other): an anyio task
    group costs three cancel scopes, several times the rest of the per-stream overhead.
    Elsewhere (trio) it is an anyio task group. Either way the watcher is done or cancelled and
    awaited before this returns.
    """
    watch = _Watch()
    host = _asyncio_task()
    if host is None:
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_disconnect, receive, watch, group.cancel_scope.cancel)
            await relay(watch)
            # See below: the watcher usually ends by itself.
            await anyio.lowlevel.checkpoint()
            group.cancel_scope.cancel()
        return watch.disconnected
    cancelling = host.cancelling()
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, watch, host.cancel))
    try:
        await relay(watch)
        # Servers like uvicorn answer a pending receive() with http.disconnect once the
        # response is complete: let the watcher end by itself. Cancelling it costs a
        # cancellation round and leaves cyclic garbage (frames, tracebacks) for the GC.
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        # Ours (the watcher's) unless someone else cancelled this task too.
        if not (watch.cut and host.uncancel() <= cancelling):
            raise
    finally:
        if not watcher.done():
            watcher.cancel()
            await asyncio.wait((watcher,))
    if not watcher.cancelled() and (error := watcher.exception()) is not None:
        raise error  # ``receive`` itself failed
    return watch.disconnected


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


class _Failed:
    """A call that may be re-tried: the error, or the (small) error answer read whole."""

    __slots__ = ("data", "error", "headers", "served", "status", "target")

    def __init__(
        self,
        *,
        error: UpstreamUnavailable | None = None,
        target: _Target | None = None,
        status: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
        data: bytes = b"",
        served: str = "",
    ) -> None:
        self.error = error
        self.target = target
        self.status = status
        self.headers = headers or []
        self.data = data
        self.served = served


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
