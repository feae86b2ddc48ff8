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
from typing import Any, NamedTuple

import anyio
import msgspec
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.sealed import SealError, open_key
from tenantware.breaker.board import RECORDED, BreakerBoard, Deployment
from tenantware.breaker.circuit import FAILURE, LIMITED, PASS, RELEASE, SLOW, SUCCESS, TIMEOUT
from tenantware.config import Upstream
from tenantware.context import Outcome, RequestContext, Usage
from tenantware.errors import GatewayError, circuit_open_error
from tenantware.formats.adapter import Adapter, adapter_for
from tenantware.formats.anthropic import ANTHROPIC_VERSION
from tenantware.metering.usage import parse_json_usage
from tenantware.ownership import MemoryOwnerStore, Owner, OwnerStore
from tenantware.proxy.migration import MigrationRunner, PrimaryCall
from tenantware.proxy.relay import Relay
from tenantware.proxy.routing import Pick, Router
from tenantware.proxy.upstream import (
    Timeouts,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnavailable,
)
from tenantware.registry import TenantView
from tenantware.state import LiveConfig, Snapshot
from tenantware.tracing import Tracing
from tenantware.types import Receive, Send

__all__ = ["CLIENT_HEADERS", "Dispatcher", "UpstreamCall", "upstream_unavailable"]

#: ``ctx.extra`` key: the client's ``anthropic-*`` headers, passed on to Anthropic upstreams.
CLIENT_HEADERS = "anthropic_headers"
#: ``ctx.extra`` key: upstream bodies made for this request, by (adapter, upstream model).
_BODIES = "upstream_bodies"

log = structlog.get_logger("tenantware.proxy")

#: Opened own keys kept in memory (a sealed value is opened once, not per request).
_MAX_OPENED = 10_000
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
        self,
        live: LiveConfig,
        client: UpstreamClient,
        board: BreakerBoard,
        relay: Relay,
        owners: OwnerStore | None = None,
    ) -> None:
        self.live = live
        #: Canary and shadow traffic (``[migration]``); set by the gateway.
        self.migration: MigrationRunner | None = None
        #: Which tenant created each response a native Responses upstream stores.
        self.owners: OwnerStore = owners or MemoryOwnerStore()
        self.client = client
        self.board = board
        self.router = Router(board)
        self.relay = relay
        self._targets: dict[str, _Target] = {}
        self._targets_version = -1
        #: How a retry waits (its backoff, or a cool-down); tests replace it to hold a retry.
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        #: Tenants' own upstream keys opened so far: sealed value -> key (in memory only).
        self._opened: dict[str, str] = {}
        #: Set when tracing is on: each attempt is a client span, its ``traceparent`` sent on.
        self.tracing: Tracing | None = None

    async def _refresh(self, snapshot: Snapshot, chain: tuple[str, ...]) -> None:
        """After a sleep: re-read the shared circuits that went stale meanwhile (Redis)."""
        if self.board.remote:
            await self.board.refresh_chain(snapshot, chain)

    def target(self, snapshot: Snapshot, upstream: Upstream) -> _Target:
        if self._targets_version != snapshot.version:
            self._targets = {u.name: _Target(u) for u in snapshot.config.upstreams}
            self._targets_version = snapshot.version
        return self._targets[upstream.name]

    def _own_key(
        self, snapshot: Snapshot, tenant: TenantView, target: _Target, headers: dict[str, str]
    ) -> bool:
        """Put the tenant's own key for ``target`` in ``headers``; whether it had one."""
        sealed = tenant.upstream_keys.get(target.upstream.name)
        if sealed is None:
            return False
        plain = self._opened.get(sealed)
        if plain is None:
            env = snapshot.config.gateway.secrets_key_env
            try:
                plain = open_key(sealed, tenant.id, target.upstream.name, env=env)
            except SealError as exc:
                # Never the gateway's key in its place: the tenant pays its own upstream.
                raise GatewayError(
                    500,
                    "Your upstream key for this request cannot be used; ask the gateway's "
                    "operator.",
                    type="server_error",
                    code="upstream_key_unusable",
                    outcome=Outcome.ERROR,
                ) from exc
            if len(self._opened) >= _MAX_OPENED:
                self._opened.clear()
            self._opened[sealed] = plain
        if target.api == "anthropic":
            headers["x-api-key"] = plain
        else:
            headers["authorization"] = f"Bearer {plain}"
        return True

    async def forward(self, ctx: RequestContext, receive: Receive, send: Send, path: str) -> None:
        """Try deployments (and fallback models) until one answers or retries run out."""
        migration = self.migration
        snapshot = self.live.current
        if migration is None or not snapshot_has_rules(snapshot):
            await self._forward(ctx, receive, send, path, None)
            return
        plan = migration.plan(snapshot, ctx)
        if plan is None:
            await self._forward(ctx, receive, send, path, None)
            return
        primary = PrimaryCall(ctx, plan, migration)
        if plan.shadows:
            send = primary.capturing(send)
        try:
            await self._forward(ctx, receive, send, path, primary)
            primary.status = ctx.status
        except GatewayError as error:
            primary.status = error.status
            raise
        except BaseException:
            primary.status = ctx.status or 500
            raise
        finally:
            if plan.shadows and not primary.launched:
                # Refused before any upstream call (no deployment ready): the shadow still
                # measures the candidate on this request.
                migration.launch(primary, self.live.current, path)
            canary = plan.canary
            migration.served(
                primary,
                canary is not None
                and ctx.upstream == canary.upstream
                and ctx.model_served == canary.model
                and not primary.canary_failed,
            )

    async def _forward(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        path: str,
        primary: PrimaryCall | None,
    ) -> None:
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
        tenant = ctx.tenant
        allowed = tenant.allowed_upstreams if tenant is not None else None
        if allowed is not None and not any(
            upstream.name in allowed for upstream in snapshot.routes[model]
        ):
            raise GatewayError(
                503,
                f"No upstream this key may use serves the model `{model}`.",
                type="server_error",
                code="model_unavailable",
                outcome=Outcome.UPSTREAM_ERROR,
            )
        chain = board.chain(snapshot, model, tenant)
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
        #: The migration rule's target for this request (a canary, or the rule's primary):
        #: tried first when its circuit lets it; on failure the usual deployments follow.
        first = self._first(snapshot, primary, allowed) if primary is not None else None
        pick = Pick(None, False, 0.0)
        deployment: Deployment | None
        while True:
            if first is not None:
                deployment, probe, first = first, False, None
            else:
                pick = await router.pick(snapshot, chain, tried, allowed)
                deployment, probe = pick.deployment, pick.probe
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
                    ctx, receive, send, path, snapshot, deployment, probe, started, primary
                )
            else:
                last = await self._traced_attempt(
                    ctx,
                    receive,
                    send,
                    path,
                    snapshot,
                    deployment,
                    probe,
                    started,
                    attempts,
                    primary,
                )
            if last is None:
                return
            if primary is not None:
                primary.attempt_failed(deployment, time.perf_counter() - started)
            if tried is None:
                tried = set()
            tried.add(deployment.key)
            if attempts >= settings.max_attempts or time.perf_counter() >= deadline:
                break
        if last is None:
            raise circuit_open_error(*board.unavailable(snapshot, model, chain, pick.wait_s))
        if last.error is not None:
            raise upstream_unavailable(last.error, last.target)
        ctx.usage = Usage()
        await self.relay.send_whole(ctx, send, last.status, last.headers, last.data, last.served)

    def _first(
        self, snapshot: Snapshot, primary: PrimaryCall, allowed: frozenset[str] | None
    ) -> Deployment | None:
        """The deployment a migration plan sends this request to first, if its circuit lets it
        (and the tenant's policy allows its upstream)."""
        migration = self.migration
        assert migration is not None
        plan = primary.plan
        if plan.canary is not None:
            found = migration.deployment(snapshot, plan.canary.upstream, plan.canary.model)
        elif plan.primary is not None:
            found = migration.deployment(snapshot, plan.primary, plan.rule.model)
        else:
            return None
        if found is None or self.board.gate(found.key) != PASS:
            return None
        if allowed is not None and (found.upstream is None or found.upstream.name not in allowed):
            return None
        return found

    def request_for(
        self, ctx: RequestContext, snapshot: Snapshot, deployment: Deployment, path: str
    ) -> UpstreamCall:
        """The call ``deployment`` gets for this request: URL, headers, body (translated or
        re-encoded when needed) and the adapter. Raises ``GatewayError`` for a body the
        upstream cannot be sent."""
        view = ctx.view
        assert view is not None
        assert deployment.upstream is not None
        target = self.target(snapshot, deployment.upstream)
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
            adapter = adapter_for(
                ctx.wire_format, target.api, path, native_responses=target.upstream.responses
            )
            url = target.base_url + adapter.upstream_path
        if adapter is not None or upstream_model != view.model or (streaming and not wants_usage):
            # Translated (or re-encoded) once per target format and model: retries and
            # fallbacks to the same pair send the bytes the first attempt sent.
            bodies: dict[tuple[Adapter | None, str], bytes] = ctx.extra.setdefault(_BODIES, {})
            made = bodies.get((adapter, upstream_model))
            if made is None:
                if adapter is not None:
                    made = adapter.body(ctx, upstream_model)
                else:
                    add_usage = streaming and not wants_usage
                    made = _rewrite(body, upstream_model, add_stream_usage=add_usage)
                bodies[adapter, upstream_model] = made
            body = made
        headers = {**target.headers, "x-request-id": ctx.request_id}
        if target.api == "anthropic" and ctx.wire_format == "anthropic":
            headers.update(ctx.extra.get(CLIENT_HEADERS, ()))
        return UpstreamCall(target, served, url, headers, body, adapter, wants_usage)

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
        primary: PrimaryCall | None = None,
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
                ctx, receive, send, path, snapshot, deployment, probe, started, primary
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
        primary: PrimaryCall | None = None,
    ) -> _Failed | None:
        """One upstream call; ``None`` when the answer went to the client."""
        view = ctx.view
        assert view is not None
        board = self.board
        key = deployment.key
        try:
            call = self.request_for(ctx, snapshot, deployment, path)
        except GatewayError:
            if probe:
                await board.release(key)
            raise
        target, served, adapter = call.target, call.served, call.adapter
        streaming = view.stream
        wants_usage = call.wants_usage
        url, headers, body = call.url, call.headers, call.body
        timeouts = target.stream_timeouts if streaming else target.whole_timeouts
        tenant = ctx.tenant
        own = False
        if tenant is not None and (tenant.upstream_keys or tenant.timeout_s is not None):
            try:
                own = self._own_key(snapshot, tenant, target, headers)
            except GatewayError:
                if probe:
                    await board.release(key)
                raise
            cap = tenant.timeout_s
            if cap is not None and cap < timeouts.total_s:
                timeouts = Timeouts(
                    min(timeouts.connect_s, cap),
                    min(timeouts.first_byte_s, cap),
                    min(timeouts.idle_s, cap),
                    cap,
                )
        ctx.own_upstream_key = own
        if self.tracing is not None:
            self.tracing.inject(headers)
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
                    timeouts=timeouts,
                )
            except UpstreamUnavailable as exc:
                outcome = TIMEOUT if isinstance(exc, UpstreamTimeout) else FAILURE
                return _Failed(error=exc, target=target)
            finally:
                if primary is not None and primary.plan.shadows and self.migration is not None:
                    # The primary call is sent: its shadow copies may go now.
                    self.migration.launch(primary, snapshot, path)
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
                        if adapter.stores_answers and status < 400:
                            await self._claim(ctx, snapshot, adapter.answer_id(data), target)
                    elif status < 400:
                        usage, _model = parse_json_usage(data)
                        ctx.usage = usage
                    else:
                        ctx.usage = Usage()
                    await self.relay.send_whole(
                        ctx, send, status, response.headers, data, served, as_sent=whole_stream
                    )
                    return None
                tap = adapter.tap(ctx, include_usage=wants_usage) if adapter else None
                await self.relay.relay_stream(
                    ctx,
                    response,
                    receive,
                    send,
                    started,
                    limit,
                    hide_usage=not wants_usage,
                    tap=tap,
                )
                if adapter is not None and adapter.stores_answers and tap is not None:
                    await self._claim(ctx, snapshot, adapter.stream_id(tap), target)
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

    async def _claim(
        self, ctx: RequestContext, snapshot: Snapshot, object_id: str | None, target: _Target
    ) -> None:
        """Record that this tenant owns the response the upstream stored (before a JSON answer
        is sent; after a stream, which the client may have left). A store outage costs the
        later ``GET`` of this response (a 404), never this answer."""
        tenant = ctx.tenant
        if object_id is None or tenant is None:
            return
        owner = Owner(tenant=tenant.id, upstream=target.upstream.name)
        ttl_s = snapshot.config.gateway.response_owner_ttl_s
        try:
            with anyio.CancelScope(shield=True):
                claimed = await self.owners.claim(object_id, owner, ttl_s)
        except STORE_UNAVAILABLE:
            log.warning("stored response owner not recorded", response_id=object_id)
            return
        if not claimed:
            log.warning(
                "upstream reused a response id another request owns",
                response_id=object_id,
                upstream=target.upstream.name,
            )

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


def snapshot_has_rules(snapshot: Snapshot) -> bool:
    """Whether any migration rule is configured (the common case: none, one check)."""
    return bool(snapshot.config.migration.rules)


class UpstreamCall(NamedTuple):
    """One call to an upstream, ready to send (``Dispatcher.request_for``)."""

    target: _Target
    served: str
    url: str
    headers: dict[str, str]
    body: bytes
    adapter: Adapter | None
    wants_usage: bool


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


def upstream_unavailable(exc: UpstreamUnavailable, target: _Target | None) -> GatewayError:
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
