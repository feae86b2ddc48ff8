"""May this request go now? Reserve every limit before the app runs, settle after it ends.

Before the inner app runs, the request reserves its estimated tokens (prompt estimate plus
``max_tokens``, or ``gateway.default_max_tokens``) and their cost, atomically over all of the
tenant's limits (and its per-model limits) and the global limits: in one decision where the
store reaches every key from one script (memory, one Redis server), else tenant first, then
global (Redis Cluster: another slot), the tenant's grant given back if the global limits
refuse. When the app returns, raises or the client leaves, the reservation settles to the
actual usage: the difference is refunded or charged by the ledger's billing rules
(``tenantware.metering.billing``: a failure before any output is refunded whole), and the
concurrency slot is always given back (a slot is a lease the store renews while the request
runs: ``quota.renewal.renewing``, a gateway service). Every response carries the
``x-ratelimit-*`` headers the OpenAI SDKs read.

On one Redis server, with the admission layer inside this one, the reservation also asks
the request's seat pool for a seat in the same script call (``tenantware.joint``), only when
every limit granted: one round trip before the upstream instead of two. The seat request and
the pool's answer go down in ``ctx.seat_request``; the admission layer takes it from there and
leaves on it what the seat's release charges, and this layer's settle releases the seat in the
same script call (one call after the response instead of two).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from random import getrandbits as _getrandbits
from typing import Final

import anyio
import structlog

from tenantware import metrics
from tenantware.admission.core import GRANTED, QUEUED
from tenantware.admission.pools import AdmissionPools
from tenantware.context import Outcome, RequestContext, get_context
from tenantware.errors import GatewayError, send_error
from tenantware.joint.store import ReserveAcquire
from tenantware.metering.billing import apply_markup, billable_usage, final_outcome
from tenantware.metering.billing import charge as charge_of
from tenantware.metering.pricing import cost_nanousd, nanousd_to_usd
from tenantware.middleware.seats import SeatRequest, seat_request
from tenantware.quota.plan import (
    KIND_BALANCE,
    KIND_MONTHLY_SPEND,
    KIND_SPEND,
    KIND_TOKENS,
    Plan,
    balance_limit,
    build_plan,
    is_global,
)
from tenantware.quota.store import Decision, QuotaStore
from tenantware.registry import TenantView
from tenantware.state import LiveConfig, Snapshot
from tenantware.tracing import QUOTA_DECISION
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["LOW_BALANCE_HEADER", "QuotaMiddleware", "format_reset"]

log = structlog.get_logger("tenantware.quota")

#: Refused as ``insufficient_quota`` (money used up), not as a rate limit.
_QUOTA_KINDS: Final = frozenset({KIND_SPEND, KIND_MONTHLY_SPEND, KIND_BALANCE})
#: On every answer of a prepaid tenant whose balance is below its threshold: the balance
#: left (USD), so the client can warn its user before requests start being refused.
LOW_BALANCE_HEADER: Final = b"x-tenantware-balance-low"
_MAX_PLANS: Final = 100_000
Headers = list[tuple[bytes, bytes]]


def format_reset(us: int) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if us <= 0:
        return "0s"
    if us < 1_000_000:
        return f"{math.ceil(us / 1000)}ms"
    seconds = math.ceil(us / 1000) / 1000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def _headers(plan: Plan, decision: Decision) -> Headers:
    """``x-ratelimit-*`` for the binding (least remaining) requests and tokens limits."""
    remaining = decision.remaining
    if not remaining:
        return []
    out: Headers = []
    for suffix, indexes in plan.header_groups:
        best = indexes[0]
        for i in indexes[1:]:
            if remaining[i] < remaining[best]:
                best = i
        limit = plan.limits[best].limit
        left = remaining[best] if remaining[best] < limit else limit
        names = _HEADER_NAMES[suffix]
        out.append((names[0], str(limit).encode()))
        out.append((names[1], str(left).encode()))
        out.append((names[2], format_reset(decision.reset_us[best]).encode()))
    return out


_HEADER_NAMES: Final = {
    suffix: (
        b"x-ratelimit-limit-" + suffix,
        b"x-ratelimit-remaining-" + suffix,
        b"x-ratelimit-reset-" + suffix,
    )
    for suffix in (b"requests", b"tokens")
}


def _ticket() -> str:
    # Unique, not secret: the process PRNG (seeded from the OS, reseeded after fork) spares a
    # getrandom syscall per request.
    return f"{_getrandbits(64):016x}"


class _Plans:
    """Plans per (tenant, model), rebuilt when the configuration version changes."""

    __slots__ = ("_plans", "_version", "merge", "prefix")

    def __init__(self, prefix: str, *, merge: bool) -> None:
        self.prefix = prefix
        self.merge = merge
        self._version = -1
        self._plans: dict[tuple[str, str | None], tuple[Plan | None, Plan | None]] = {}

    def get(
        self, snapshot: Snapshot, tenant: TenantView, model: str | None
    ) -> tuple[Plan | None, Plan | None]:
        if snapshot.version != self._version:
            self._plans = {}
            self._version = snapshot.version
        key = (tenant.id, model)
        plans = self._plans.get(key)
        if plans is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()  # models may be free-form when the catalogue is empty
            if not snapshot.config.quota.enabled:
                # Quotas off: only a prepaid tenant's balance (the caller checked it is one).
                only = balance_limit(self.prefix, tenant.id, tenant.low_balance_nanousd)
                plans = (Plan([only]), None)
                self._plans[key] = plans
                return plans
            plans = build_plan(
                snapshot.config,
                tenant.id,
                tenant.limits,
                model,
                self.prefix,
                merge=self.merge,
                balance_low=tenant.low_balance_nanousd if tenant.prepaid else None,
            )
            self._plans[key] = plans
        return plans


class _Held:
    """One granted reservation of one scope, to settle later."""

    __slots__ = ("decision", "plan")

    def __init__(self, plan: Plan, decision: Decision) -> None:
        self.plan = plan
        self.decision = decision


class _BalanceGauges:
    """Each tenant's last seen balance, read by its two gauges when ``/metrics`` is scraped:
    a prepaid request writes two list items instead of taking two gauge locks."""

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: dict[str, list[int]] = {}

    def of(self, tenant_id: str) -> list[int]:
        """``[balance, low]`` of ``tenant_id`` (its gauges read them)."""
        cell = self._cells.get(tenant_id)
        if cell is None:
            cell = self._cells[tenant_id] = [0, 0]
            metrics.BALANCE_NANOUSD.labels(tenant_id).set_function(lambda: cell[0])
            metrics.BALANCE_LOW.labels(tenant_id).set_function(lambda: cell[1])
        return cell


_balance_gauges = _BalanceGauges()


def _watch_balance(tenant: TenantView, plan: Plan, decision: Decision, headers: Headers) -> None:
    """The low-balance warning: metrics, the header while below, a log line per crossing."""
    index = plan.balance_index
    left = decision.remaining[index]
    threshold = plan.limits[index].p1
    cell = _balance_gauges.of(tenant.id)
    if decision.allowed:
        cell[0] = left
    low = left < threshold
    cell[1] = 1 if low else 0
    if low:
        headers.append((LOW_BALANCE_HEADER, str(nanousd_to_usd(left)).encode()))
    if decision.reset_us[index] == 1:
        # Once per crossing, across every replica (the store marks it until a credit).
        log.warning(
            "prepaid balance below its threshold",
            tenant_id=tenant.id,
            balance_nanousd=left,
            threshold_nanousd=threshold,
        )


def _settles(plan: Plan, tokens_delta: int, cost_delta: int, charge_delta: int) -> bool:
    """Whether a settle (not a cancel) has anything to correct in the store: a slot to
    free, or usage that differs from the reservation on a limit that counts it."""
    return plan.holds_slots or bool(
        (tokens_delta or cost_delta or charge_delta) and plan.counts_usage
    )


async def _withdraw(ctx: RequestContext, request: SeatRequest) -> None:
    """A seat request the admission layer never took (it did not run): give its seat or
    queue place back."""
    ctx.seat_request = None
    if request.status == GRANTED or request.status == QUEUED:
        await request.store.cancel(request.ticket)


class QuotaMiddleware:
    """Pure ASGI: ``QuotaMiddleware(app, live=live, store=MemoryQuotaStore())``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        live: LiveConfig,
        store: QuotaStore,
        admission: AdmissionPools | None = None,
        joint: ReserveAcquire | None = None,
    ) -> None:
        self.app = app
        self.live = live
        self.store = store
        #: The admission layer's pools (the layer inside this one) and the store call that
        #: reserves and asks them for a seat at once (a single Redis): one round trip.
        self._pools = admission
        self._joint = joint if admission is not None else None
        self._plans = _Plans(store.prefix, merge=store.single_node)
        #: A store that never yields (memory) needs no shield around its settle (a cancel
        #: scope per request saved); any other store's settle is shielded from cancellation.
        self._shield_settle = store.yields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        snapshot = self.live.current
        tenant = ctx.tenant
        if tenant is None or not (snapshot.config.quota.enabled or tenant.prepaid):
            # A prepaid balance is billing, not a limit: it is checked with quotas off too.
            await self.app(scope, receive, send)
            return
        tenant_plan, global_plan = self._plans.get(snapshot, tenant, ctx.model)
        if tenant_plan is None and global_plan is None:
            await self.app(scope, receive, send)
            return

        view = ctx.view
        tokens = 0
        if view is not None:
            cap = view.output_cap
            output = (cap if cap is not None else snapshot.config.gateway.default_max_tokens) * (
                view.n or 1
            )
            tokens = ctx.estimated_prompt_tokens + output
            price = snapshot.catalogue.price(ctx.model) if ctx.model else None
            cost = cost_nanousd(price, ctx.estimated_prompt_tokens, output) if price else 0
        else:
            cost = 0
        # What a prepaid balance pays: the cost with the tenant's markup, as the ledger bills.
        markup = snapshot.config.metering.markup_percent.get(tenant.id) if tenant.prepaid else None
        charge = apply_markup(cost, markup)
        ticket = _ticket()
        held: list[_Held] = []
        headers: Headers = []
        plans = [plan for plan in (tenant_plan, global_plan) if plan is not None]
        refused: tuple[Plan, Decision] | None = None
        joint = self._joint
        request: SeatRequest | None = None
        if joint is not None and self._pools is not None and len(plans) == 1:
            # The admission layer's seat request, asked in the reservation's call when that
            # call reaches the pool; handed down either way (built once).
            request = seat_request(self._pools, snapshot, ctx, scope)
            if request is not None and not joint.serves(request.store):
                joint = None
        try:
            for plan in plans:
                if joint is not None and request is not None:
                    decision, request.status = await joint.reserve_acquire(
                        plan,
                        tokens,
                        cost,
                        ticket,
                        None if plan.balance_index < 0 else charge,
                        request.store,
                        request.ticket,
                    )
                elif plan.balance_index < 0:
                    decision = await self.store.reserve(plan, tokens, cost, ticket)
                else:
                    decision = await self.store.reserve(plan, tokens, cost, ticket, charge=charge)
                if plan is tenant_plan:
                    headers = _headers(plan, decision)
                    if plan.balance_index >= 0 and decision.source == "store":
                        _watch_balance(tenant, plan, decision, headers)
                if not decision.allowed:
                    refused = (plan, decision)
                    break
                held.append(_Held(plan, decision))
        finally:
            if held and len(held) < len(plans):
                # Refused by a later scope, or cancelled midway: give back what was granted.
                with anyio.CancelScope(shield=True):
                    for granted in held:
                        await self._settle_one(
                            granted, ticket, -tokens, -cost, -charge, cancel=True
                        )
        if refused is not None:
            plan, decision = refused
            limit = plan.limits[decision.failed].name if decision.source != "closed" else ""
            ctx.extra[QUOTA_DECISION] = (False, decision.source, limit)
            await self._reject(send, ctx, tenant, plan, decision, tokens, headers)
            return
        if held:
            source = held[0].decision.source
            for granted in held:  # a scope's fallback answer names the decision
                if granted.decision.source != "store":
                    source = granted.decision.source
            ctx.extra[QUOTA_DECISION] = (True, source, "")

        def send_with_headers(message: Message) -> Awaitable[None]:
            # A plain function returning ``send``'s awaitable: no coroutine per message.
            if message["type"] == "http.response.start" and headers:
                message["headers"] = [*message.get("headers", ()), *headers]
            return send(message)

        if self._shield_settle:
            # Inner layers' after-response calls (the admission release) join the settle.
            ctx.after_response = []
        if request is not None:
            ctx.seat_request = request
        try:
            await self.app(scope, receive, send_with_headers)
        except GatewayError as error:
            # An inner app's refusal: answered here so it carries the headers like any other.
            if ctx.response_started:
                raise
            await error.send(send_with_headers, ctx)
        finally:
            if self._shield_settle:
                joined = ctx.after_response
                ctx.after_response = None
                with anyio.CancelScope(shield=True):
                    if request is not None and ctx.seat_request is request:
                        await _withdraw(ctx, request)
                    # The seat this layer asked for and the admission layer used: given back
                    # here, with the settle.
                    release = request if request is not None and request.usage else None
                    if joined:
                        await self._settle_with(
                            joined, ctx, snapshot, held, ticket, tokens, cost, charge, release
                        )
                    else:
                        await self._settle(
                            ctx, snapshot, held, ticket, tokens, cost, charge, release
                        )
            else:
                await self._settle(ctx, snapshot, held, ticket, tokens, cost, charge)

    async def _settle_with(
        self,
        joined: list[Awaitable[None]],
        ctx: RequestContext,
        snapshot: Snapshot,
        held: list[_Held],
        ticket: str,
        tokens: int,
        cost: int,
        charge: int,
        release: SeatRequest | None = None,
    ) -> None:
        """The settle, with the release of the seat this layer asked for (``release``), then
        the answers of the inner layers' calls: those were sent when the inner layers ended,
        in this event-loop turn, so the settle leaves in the same write on a pipelined
        connection and one wait covers them all."""
        try:
            await self._settle(ctx, snapshot, held, ticket, tokens, cost, charge, release)
        finally:
            failure: BaseException | None = None
            for answer in joined:
                try:
                    await answer  # each exactly once, whatever the others did
                except Exception as exc:
                    failure = failure or exc
            if failure is not None:
                raise failure

    async def _settle(
        self,
        ctx: RequestContext,
        snapshot: Snapshot,
        held: list[_Held],
        ticket: str,
        tokens: int,
        cost: int,
        charge: int,
        release: SeatRequest | None = None,
    ) -> None:
        """Charge the actual usage: refund (or add) the difference to every scope; give
        back the seat of ``release`` (with the settle in one call where one reaches both)."""
        corrections: list[tuple[_Held, int, int, int]] | None = None
        try:
            corrections = self._corrections(ctx, snapshot, held, tokens, cost, charge)
        finally:
            if corrections is None and release is not None and release.usage is not None:
                await release.store.release(release.ticket, *release.usage)  # all the same
        answer: Awaitable[None] | None = None
        if release is not None and release.usage is not None:
            joint = self._joint
            if joint is not None and len(corrections) == 1 and joint.serves(release.store):
                granted, tokens_delta, cost_delta, charge_delta = corrections[0]
                if (
                    granted.decision.source == "store"
                    and _settles(granted.plan, tokens_delta, cost_delta, charge_delta)
                    and await joint.settle_release(
                        granted.plan,
                        granted.decision.now_us,
                        ticket,
                        tokens_delta,
                        cost_delta,
                        charge_delta,
                        release.store,
                        release.ticket,
                        *release.usage,
                    )
                ):
                    return
            # Sent first, so that the settle leaves in the same write; awaited after it.
            answer = release.store.start_release(release.ticket, *release.usage)
        try:
            for granted, tokens_delta, cost_delta, charge_delta in corrections:
                await self._settle_one(granted, ticket, tokens_delta, cost_delta, charge_delta)
        finally:
            if answer is not None:
                await answer

    def _corrections(
        self,
        ctx: RequestContext,
        snapshot: Snapshot,
        held: list[_Held],
        tokens: int,
        cost: int,
        charge: int,
    ) -> list[tuple[_Held, int, int, int]]:
        """Each scope with its tokens, cost and charge deltas (actual minus reserved)."""
        # The ledger's billing rules: a failure before any output is refunded whole, a
        # client gone mid-stream pays for what the upstream produced.
        usage = billable_usage(final_outcome(ctx), ctx.usage)
        if usage is None:
            actual_tokens = actual_cost = 0
        else:
            actual_tokens = usage.input_tokens + usage.output_tokens
            model = ctx.model_served or ctx.model
            price = snapshot.catalogue.price(model) if model else None
            actual_cost = (
                cost_nanousd(
                    price,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cached_tokens,
                    usage.cache_write_tokens,
                )
                if price is not None
                else 0
            )
        ctx.cost_nanousd = actual_cost
        own_key = ctx.own_upstream_key
        if own_key:
            # Metered (the list cost stays on the record), charged to no budget or balance.
            actual_cost = 0
        actual_charge = actual_cost
        corrections = []
        for granted in held:
            if granted.plan.balance_index >= 0 and granted.decision.source == "store":
                tenant = ctx.tenant
                assert tenant is not None
                markup = snapshot.config.metering.markup_percent.get(tenant.id)
                actual_charge = charge_of(actual_cost, markup, own_key=own_key)
                # The ledger journals this debit with the request's usage record.
                ctx.balance_debit_nanousd = actual_charge
            corrections.append(
                (granted, actual_tokens - tokens, actual_cost - cost, actual_charge - charge)
            )
        return corrections

    async def _settle_one(
        self,
        granted: _Held,
        ticket: str,
        tokens_delta: int,
        cost_delta: int,
        charge_delta: int,
        *,
        cancel: bool = False,
    ) -> None:
        decision = granted.decision
        plan = granted.plan
        if not (cancel or _settles(plan, tokens_delta, cost_delta, charge_delta)):
            # Nothing to correct (usage matched, or only request-rate limits, which a settle
            # changes on cancel only): spare the store a round trip.
            return
        source = decision.source
        if source == "store" or source == "local":  # ``open``: nothing was reserved
            await self.store.settle(
                granted.plan,
                decision.now_us,
                ticket,
                tokens_delta,
                cost_delta,
                cancel=cancel,
                local=source == "local",
                charge_delta=charge_delta,
            )

    async def _reject(
        self,
        send: Send,
        ctx: RequestContext,
        tenant: TenantView,
        plan: Plan,
        decision: Decision,
        tokens: int,
        headers: Headers,
    ) -> None:
        if decision.source == "closed":
            metrics.REJECTIONS.labels(tenant.id, "store_unavailable").inc()
            await send_error(
                send,
                503,
                "Quota checks are temporarily unavailable; please retry shortly.",
                type="server_error",
                code="quota_unavailable",
                ctx=ctx,
                outcome=Outcome.REJECTED_QUOTA,
                retry_after=decision.retry_after_us / 1_000_000,
                should_retry=True,
                headers=headers,
            )
            return
        limit = plan.limits[decision.failed]
        metrics.REJECTIONS.labels(tenant.id, limit.group).inc()
        scope_name = "the gateway's shared " if is_global(limit) else ""
        if limit.kind in _QUOTA_KINDS:
            if limit.kind == KIND_BALANCE:
                cell = _balance_gauges.of(tenant.id)
                cell[0] = decision.remaining[decision.failed]
                cell[1] = 1
                used_up = (
                    "your prepaid balance does not cover this request. Please top up your balance."
                )
            else:
                used_up = (
                    f"{scope_name}{limit.name} is used up. "
                    "Please check your plan and billing details."
                )
            await send_error(
                send,
                429,
                f"You exceeded your current quota: {used_up}",
                type="insufficient_quota",
                code="insufficient_quota",
                ctx=ctx,
                outcome=Outcome.REJECTED_BUDGET,
                should_retry=False,
                headers=headers,
            )
            return
        retry_s = decision.retry_after_us / 1_000_000
        never = limit.kind == KIND_TOKENS and tokens > limit.p2
        if never:
            message = (
                f"Request too large for {scope_name}{limit.name}: limit {limit.limit}, "
                f"requested {tokens}. Reduce max_tokens or the prompt."
            )
        else:
            message = (
                f"Rate limit reached for {scope_name}{limit.name}: limit {limit.limit}. "
                f"Please try again in {format_reset(decision.retry_after_us)}."
            )
        await send_error(
            send,
            429,
            message,
            type="tokens" if limit.kind == KIND_TOKENS else "requests",
            code="rate_limit_exceeded",
            ctx=ctx,
            outcome=Outcome.REJECTED_QUOTA,
            retry_after=None if never else retry_s,
            should_retry=False if never else None,
            headers=headers,
        )
