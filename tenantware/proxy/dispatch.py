"""The retry and fallback loop: which deployment a call goes to, and what happens on failure.

Deployments (and fallback models) are tried until one answers or the retries run out; each
call's outcome is recorded on its deployment's circuit. A call is re-tried elsewhere (or,
after a full-jitter backoff, on a deployment already tried) only when nothing was sent to the
client yet: connection errors, timeouts, 5xx and 429. Other answers, and every stream once it
started, go to the client as they are (through ``Relay``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from tenantware.breaker.board import RECORDED, BreakerBoard, Deployment
from tenantware.breaker.circuit import FAILURE, LIMITED, RELEASE, SLOW, SUCCESS, TIMEOUT
from tenantware.config import Upstream
from tenantware.context import Outcome, RequestContext, Usage
from tenantware.errors import GatewayError, circuit_open_error
from tenantware.formats.adapter import Adapter, adapter_for
from tenantware.formats.anthropic import ANTHROPIC_VERSION
from tenantware.metering.usage import parse_json_usage
from tenantware.proxy.relay import Relay
from tenantware.proxy.routing import Router
from tenantware.proxy.upstream import (
    Timeouts,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnavailable,
)
from tenantware.state import LiveConfig, Snapshot
from tenantware.tracing import Tracing
from tenantware.types import Receive, Send

__all__ = ["CLIENT_HEADERS", "Dispatcher"]

#: ``ctx.extra`` key: the client's ``anthropic-*`` headers, passed on to Anthropic upstreams.
CLIENT_HEADERS = "anthropic_headers"

_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class _Target:
    """An upstream's URL base, request headers and time limits, built once per config version."""

    __slots__ = ("api", "base_url", "headers", "stream_timeouts", "upstream", "whole_timeouts")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.api = upstream.api
        self.base_url = upstream.base_url.rstrip("/")
        connect, total = upstream.connect_timeout_s, upstream.timeout_s
        #: A stream's headers come at once, long before its first token: a short bound.
        self.stream_timeouts = Timeouts(
            connect, min(upstream.first_byte_timeout_s, total), upstream.idle_timeout_s, total
        )
        #: A whole (non-streaming) answer's headers come with the answer: only the total.
        self.whole_timeouts = Timeouts(connect, total, upstream.idle_timeout_s, total)
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if upstream.api == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
        headers.update(upstream.headers)
        key = upstream.api_key()
        if key and upstream.api == "anthropic":
            headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        self.headers = headers


class Dispatcher:
    """``Dispatcher(live, client, board, relay)``: sends a request to the model's upstreams.

    Raises ``GatewayError`` only before anything was sent (no upstream configured, all
    circuits open, every attempt failed); ``ProxyApp`` answers it.
    """

    def __init__(
        self, live: LiveConfig, client: UpstreamClient, board: BreakerBoard, relay: Relay
    ) -> None:
        self.live = live
        self.client = client
        self.board = board
        self.router = Router(board)
        self.relay = relay
        self._targets: dict[str, _Target] = {}
        self._targets_version = -1
        #: How a retry waits (its backoff, or a cool-down); tests replace it to hold a retry.
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        #: Set when tracing is on: each attempt is a client span, its ``traceparent`` sent on.
        self.tracing: Tracing | None = None

    async def _refresh(self, snapshot: Snapshot, chain: tuple[str, ...]) -> None:
        """After a sleep: re-read the shared circuits that went stale meanwhile (Redis)."""
        if self.board.remote:
            await self.board.refresh_chain(snapshot, chain)

    def _target(self, snapshot: Snapshot, upstream: Upstream) -> _Target:
        if self._targets_version != snapshot.version:
            self._targets = {u.name: _Target(u) for u in snapshot.config.upstreams}
            self._targets_version = snapshot.version
        return self._targets[upstream.name]

    async def forward(self, ctx: RequestContext, receive: Receive, send: Send, path: str) -> None:
        """Try deployments (and fallback models) until one answers or retries run out."""
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
        #: This retry already slept its backoff: the pick made after it is called at once.
        backed_off = False
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
                await self.sleep(wait)
                await self._refresh(snapshot, chain)
                continue
            if tried is not None and deployment.key in tried and not backed_off:
                # Only deployments this request tried are ready (never a probe: probes go to
                # untried ones). Sleep the backoff, then ask the board again: a circuit that
                # opened meanwhile (other requests' failures) is not called.
                delay = router.backoff(attempts - 1)
                if time.perf_counter() + delay >= deadline:
                    break
                await self.sleep(delay)
                await self._refresh(snapshot, chain)
                backed_off = True
                continue
            backed_off = False
            attempts += 1
            if self.tracing is None:
                last = await self._attempt(
                    ctx, receive, send, path, snapshot, deployment, pick.probe, started
                )
            else:
                last = await self._traced_attempt(
                    ctx, receive, send, path, snapshot, deployment, pick.probe, started, attempts
                )
            if last is None:
                return
            if tried is None:
                tried = set()
            tried.add(deployment.key)
            if attempts >= settings.max_attempts or time.perf_counter() >= deadline:
                break
        if last is None:
            raise circuit_open_error(*board.unavailable(snapshot, model, chain, pick.wait_s))
        if last.error is not None:
            raise _unavailable(last.error, last.target)
        ctx.usage = Usage()
        await self.relay.send_whole(ctx, send, last.status, last.headers, last.data, last.served)

    async def _traced_attempt(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        path: str,
        snapshot: Snapshot,
        deployment: Deployment,
        probe: bool,
        started: float,
        number: int,
    ) -> _Failed | None:
        """``_attempt`` inside a client span of its own: retries and fallbacks are siblings
        under the request's server span."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracing = self.tracing
        assert tracing is not None
        assert deployment.upstream is not None
        with tracing.tracer.start_as_current_span(
            "upstream attempt",
            kind=SpanKind.CLIENT,
            attributes={
                "tenantware.attempt": number,
                "tenantware.upstream": deployment.upstream.name,
                "tenantware.deployment": deployment.key,
                "tenantware.model_served": deployment.model,
                "tenantware.probe": probe,
            },
        ) as span:
            failed = await self._attempt(
                ctx, receive, send, path, snapshot, deployment, probe, started
            )
            if failed is None:
                span.set_attribute("http.response.status_code", ctx.status)
                if ctx.outcome == Outcome.UPSTREAM_ERROR:
                    span.set_status(Status(StatusCode.ERROR, "stream broke"))
            elif failed.error is not None:
                span.set_attribute("error.type", type(failed.error).__name__)
                span.set_status(Status(StatusCode.ERROR, type(failed.error).__name__))
            else:
                span.set_attribute("http.response.status_code", failed.status)
                span.set_attribute("error.type", str(failed.status))
                span.set_status(Status(StatusCode.ERROR, f"upstream answered {failed.status}"))
            return failed

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
        adapter: Adapter | None = None
        url = target.base_url + path
        if target.api != "openai" or ctx.wire_format != "openai":
            # Another format on either side: the adapter translates (tenantware.formats).
            try:
                adapter = adapter_for(
                    ctx.wire_format, target.api, path, native_responses=target.upstream.responses
                )
                body = adapter.body(ctx, upstream_model)
            except GatewayError:
                if probe:
                    await board.release(key)
                raise
            url = target.base_url + adapter.upstream_path
        elif upstream_model != view.model or (streaming and not wants_usage):
            try:
                body = _rewrite(
                    body, upstream_model, add_stream_usage=streaming and not wants_usage
                )
            except GatewayError:
                if probe:
                    await board.release(key)
                raise
        headers = {**target.headers, "x-request-id": ctx.request_id}
        if self.tracing is not None:
            self.tracing.inject(headers)
        if target.api == "anthropic" and ctx.wire_format == "anthropic":
            headers.update(ctx.extra.get(CLIENT_HEADERS, ()))
        ctx.upstream = target.upstream.name
        ctx.model_served = served
        inflight = board.inflight
        inflight[key] = inflight.get(key, 0) + 1
        outcome = RELEASE
        cool_s = 0.0
        limit = target.upstream.max_response_bytes
        try:
            called = time.perf_counter()
            try:
                response = await self.client.request(
                    "POST",
                    url,
                    headers=headers,
                    body=body,
                    timeouts=target.stream_timeouts if streaming else target.whole_timeouts,
                )
            except UpstreamUnavailable as exc:
                outcome = TIMEOUT if isinstance(exc, UpstreamTimeout) else FAILURE
                return _Failed(error=exc, target=target)
            try:
                status = response.status
                if status == 429 or status >= 500:
                    outcome = FAILURE
                    if status == 429:
                        outcome = LIMITED
                        cool_s = self._cooldown(response)
                    try:
                        data = await response.read(limit)
                    except UpstreamUnavailable as exc:
                        return _Failed(error=exc, target=target)
                    except UpstreamTooLarge as exc:
                        raise _too_large(exc, target) from None
                    ctx.upstream_latency_s = time.perf_counter() - started
                    if adapter is not None:
                        data = adapter.answer(ctx, status, data, None)
                    return _Failed(
                        status=status, headers=response.headers, data=data, served=served
                    )
                slow = time.perf_counter() - called > board.deployment_policy.slow_call_s
                # A stream answered with a whole body (JSON): relayed whole, as it came.
                whole_stream = streaming and status < 400 and not _is_event_stream(response)
                if status >= 400 or not streaming or whole_stream:
                    outcome = SLOW if slow else SUCCESS
                    try:
                        data = await response.read(limit)
                    except UpstreamUnavailable as exc:
                        outcome = TIMEOUT if isinstance(exc, UpstreamTimeout) else FAILURE
                        return _Failed(error=exc, target=target)
                    except UpstreamTooLarge as exc:
                        raise _too_large(exc, target) from None
                    ctx.upstream_latency_s = time.perf_counter() - started
                    if adapter is not None:
                        usage = adapter.usage(data) if status < 400 else Usage()
                        data = adapter.answer(ctx, status, data, usage)
                        ctx.usage = usage
                    elif status < 400:
                        usage, _model = parse_json_usage(data)
                        ctx.usage = usage
                    else:
                        ctx.usage = Usage()
                    await self.relay.send_whole(
                        ctx, send, status, response.headers, data, served, as_sent=whole_stream
                    )
                    return None
                await self.relay.relay_stream(
                    ctx,
                    response,
                    receive,
                    send,
                    started,
                    limit,
                    hide_usage=not wants_usage,
                    tap=adapter.tap(ctx, include_usage=wants_usage) if adapter else None,
                )
                broke = ctx.outcome == Outcome.UPSTREAM_ERROR
                outcome = FAILURE if broke else SLOW if slow else SUCCESS
                return None
            finally:
                closing = response.close_now()
                if closing is not None:
                    with anyio.CancelScope(shield=True):
                        await closing
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


def _rewrite(body: bytes, model: str, *, add_stream_usage: bool) -> bytes:
    """The body with the upstream's model name and, for streams, usage reporting switched on.

    The tenant layer decoded only the fields it acts on; here the whole body is, so what it
    skipped unread (invalid UTF-8 in a string, a number no float holds) is refused now.
    """
    try:
        data: dict[str, Any] = _decode_any(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise GatewayError(
            400,
            f"We could not parse the JSON body of your request: {exc}.",
            outcome=Outcome.REJECTED_REQUEST,
        ) from None
    except RecursionError:
        raise GatewayError(
            400,
            "The JSON body of your request is nested too deeply.",
            code="json_too_deep",
            outcome=Outcome.REJECTED_REQUEST,
        ) from None
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


def _too_large(exc: UpstreamTooLarge, target: _Target) -> GatewayError:
    return GatewayError(
        502,
        f"The answer of the upstream `{target.upstream.name}` is larger than the gateway "
        f"relays ({exc.limit} bytes): it was cut.",
        type="server_error",
        code="upstream_response_too_large",
        outcome=Outcome.UPSTREAM_ERROR,
        should_retry=False,
    )


def _is_event_stream(response: UpstreamResponse) -> bool:
    content_type = response.header("content-type")
    return content_type is None or "event-stream" in content_type
