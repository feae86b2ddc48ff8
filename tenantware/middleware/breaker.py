"""Is the upstream healthy, and is this tenant's client? Rejects early when either is not.

For any inner app: a tenant whose own requests keep failing (4xx but 401/403/429, e.g. a client
looping on a bad request) gets 429 ``tenant_circuit_open`` until its circuit lets a probe
through; a model whose every deployment, and every fallback the tenant may use, is open or
cooling gets 503 ``circuit_open`` with ``retry-after`` = time until the next probe. The
bundled proxy records each upstream call itself (it retries and falls back); for any other
app (models no configured upstream serves) the response status is recorded against
``app/<model>``, and this layer takes that circuit's half-open probes. Being innermost, it
also answers a ``GatewayError`` that the app raises (see ``tenantware.context``).
"""

from __future__ import annotations

from typing import Final

import anyio

from tenantware.breaker.board import RECORDED, BreakerBoard, circuit_open
from tenantware.breaker.circuit import (
    CLOSED,
    FAILURE,
    LIMITED,
    PASS,
    PROBE,
    PROBE_BUSY_WAIT_S,
    RELEASE,
    SUCCESS,
)
from tenantware.context import Outcome, RequestContext, Unavailable, get_context
from tenantware.errors import GatewayError, circuit_open_error
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Receive, Scope, Send

__all__ = ["BreakerMiddleware", "TenantRefusals"]

_RETRY_CODE: Final = "tenant_circuit_open"
#: 4xx answers that do not count against a tenant: a limit (429), and an upstream refusing
#: the gateway's own credentials (401/403), which is an operator's problem.
_NOT_THE_CLIENTS_FAULT: Final = frozenset({401, 403, 429})
#: The tenant layer's refusals that do not count: no known key (401) and a limit (429). Its
#: 403 is the client's (a model its key may not use), not an upstream's.
_NOT_A_REFUSAL_OF_THE_CLIENT: Final = frozenset({401, 429})


class BreakerMiddleware:
    """Pure ASGI: ``BreakerMiddleware(app, live=..., board=gateway.board)``."""

    def __init__(self, app: ASGIApp, *, live: LiveConfig, board: BreakerBoard) -> None:
        self.app = app
        self.live = live
        self.board = board

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope) if scope["type"] == "http" else None
        board = self.board
        if ctx is None or ctx.tenant is None or not board.enabled:
            await self.app(scope, receive, send)
            return
        snapshot = self.live.current
        tenant_key = board.tenant_key(ctx.tenant.id)
        tenant_policy = board.tenant_policy
        model = ctx.model
        chain: tuple[str, ...] = ()
        #: The inner app's own circuit when no configured upstream serves the model.
        app_key: str | None = None
        if model is not None:
            first = board.deployments(snapshot, model)[0]
            if first.upstream is None:
                app_key = first.key
            else:
                chain = board.chain(snapshot, model, ctx.tenant)
        if board.remote:
            await board.store.refresh((tenant_key,), tenant_policy)
            if app_key is not None:
                await board.store.refresh((app_key,), board.deployment_policy)
            elif chain:
                await board.refresh_chain(snapshot, chain)
        tenant_probe = app_probe = False
        wait = board.gate(tenant_key)
        if wait != PASS:
            if wait == PROBE and await board.take_probe(tenant_key, tenant_policy):
                tenant_probe = True
            else:
                await _tenant_open(wait if wait > 0 else 1.0).send(send, ctx)
                return
        if app_key is not None:
            wait = board.gate(app_key)
            if wait == PROBE and await board.take_probe(app_key):
                app_probe = True
            elif wait != PASS:
                wait = wait if wait > 0 else PROBE_BUSY_WAIT_S
        elif chain:
            # The proxy takes probes itself; here it is enough that one deployment may go.
            wait = board.chain_wait(snapshot, chain)
        if wait > 0:
            if tenant_probe:
                await board.release(tenant_key, tenant_policy)
            assert model is not None
            if app_key is not None:
                why: Unavailable = "cooling" if board.state(app_key) == CLOSED else "open"
                decision = circuit_open(model, wait, why)
            else:
                decision = board.unavailable(snapshot, model, chain, wait)
            await circuit_open_error(*decision).send(send, ctx)
            return
        status = 0
        try:
            await self.app(scope, receive, send)
            status = ctx.status
        except GatewayError as error:
            # The app's chosen answer, not a crash: sent here, the innermost layer, so it
            # passes the outer layers' ``send`` like a sent one, and judged by its status (a
            # client's 400 does not open the app's circuit).
            if ctx.response_started:
                status = 500
                raise
            await error.send(send, ctx)
            status = ctx.status
        except BaseException:
            status = 500
            raise
        finally:
            if board.remote:
                with anyio.CancelScope(shield=True):
                    await self._settle(ctx, status, tenant_probe, app_key, app_probe)
            else:
                # The memory store never yields, so a cancellation cannot cut this short.
                await self._settle(ctx, status, tenant_probe, app_key, app_probe)

    async def _settle(
        self,
        ctx: RequestContext,
        status: int,
        tenant_probe: bool,
        app_key: str | None,
        app_probe: bool,
    ) -> None:
        board = self.board
        if 400 <= status < 500 and status not in _NOT_THE_CLIENTS_FAULT:
            tenant_outcome = FAILURE
        elif status and status < 400:
            tenant_outcome = SUCCESS
        else:
            # Upstream trouble, a limit or no answer: says nothing about the tenant's client.
            tenant_outcome = RELEASE
        if tenant_outcome != RELEASE or tenant_probe:
            await board.record(
                board.tenant_key(ctx.tenant_id or ""),
                tenant_outcome,
                probe=tenant_probe,
                policy=board.tenant_policy,
            )
        if app_key is None or ctx.extra.get(RECORDED):
            return
        if status >= 500:
            outcome = FAILURE
        elif status == 429:
            outcome = LIMITED
        elif status:
            outcome = SUCCESS
        else:
            outcome = RELEASE  # the client left before any answer
        if outcome != RELEASE or app_probe:
            await board.record(
                app_key, outcome, probe=app_probe, cool_s=board.settings.default_cooldown_s
            )


class TenantRefusals:
    """The tenant layer's own refusals of a known tenant (malformed body, unknown or disallowed
    model, body too large) as failures of the tenant's circuit, as this layer counts the 4xx
    answers it sees: ``TenantMiddleware(on_refusal=TenantRefusals(live=..., board=...))``.

    That layer sits outside this one (everything needs the tenant first), so without this a
    client looping on malformed JSON would never be paused. While the circuit is open the
    refusal becomes the pause (``429 tenant_circuit_open``); past its wait, the refusal is the
    probe. ``breaker.count_tenant_refusals = false`` turns it off.
    """

    def __init__(self, *, live: LiveConfig, board: BreakerBoard) -> None:
        self.live = live
        self.board = board

    async def __call__(self, ctx: RequestContext, error: GatewayError) -> GatewayError:
        board = self.board
        status = error.status
        if (
            ctx.tenant is None
            or not board.enabled
            or not 400 <= status < 500
            or status in _NOT_A_REFUSAL_OF_THE_CLIENT
            or not self.live.current.config.breaker.count_tenant_refusals
        ):
            return error
        key = board.tenant_key(ctx.tenant.id)
        policy = board.tenant_policy
        if board.remote:
            await board.store.refresh((key,), policy)
        probe = False
        wait = board.gate(key)
        if wait != PASS:
            if wait == PROBE and await board.take_probe(key, policy):
                probe = True
            else:
                return _tenant_open(wait if wait > 0 else 1.0)
        if board.remote:
            with anyio.CancelScope(shield=True):
                await board.record(key, FAILURE, probe=probe, policy=policy)
        else:
            await board.record(key, FAILURE, probe=probe, policy=policy)
        return error


def _tenant_open(wait: float) -> GatewayError:
    return GatewayError(
        429,
        "Too many of this API key's recent requests failed (for example the same invalid "
        f"request sent in a loop); its requests are paused for {max(1, round(wait))} s. "
        "Fix the request before retrying.",
        type="requests",
        code=_RETRY_CODE,
        outcome=Outcome.BREAKER_OPEN,
        retry_after=wait,
        should_retry=False,
    )
