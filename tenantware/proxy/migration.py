"""Canary and shadow traffic of the migration rules (``[migration]``), for the dispatcher.

``MigrationRunner.plan`` says where a request goes (``tenantware.migration.rules``). The
dispatcher serves a canary request from its candidate (falling back to the usual deployments
when that call fails before answering) and reports every served request here, which feeds
the rollback windows and the comparison book.

A shadow copy is started after the primary call was sent, as a task of the runner's task
group: the gateway's lifetime owns it, and shutdown cancels it. Each candidate has a
``CapacityLimiter`` of ``shadow_concurrency`` slots, taken without waiting: a copy finding
none free is dropped and counted, never queued. A copy has its own time limit, no retry, no
quota, and is metered in the ledger with outcome ``shadow`` and its own cost (never charged
to the tenant). Its answer is read to the end (streams as streams), measured, compared with
the primary's and discarded.

With Redis (``gateway.redis_url``) the report and the rollbacks are the fleet's: comparisons
are folded into counters (``migration.tally``) and sent every ``FLUSH_S`` by a task of the
same group, one pipeline per batch, never on a request's path; rollbacks judged here are
published and those judged elsewhere taken up in the same round.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.breaker.board import Deployment
from tenantware.config import MigrationSettings
from tenantware.context import Outcome, RequestContext, Usage
from tenantware.errors import GatewayError
from tenantware.metering.billing import SHADOW
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.pricing import cost_nanousd
from tenantware.metering.usage import (
    USAGE_BOUNDS,
    StreamTap,
    UsageBounds,
    parse_json_usage,
)
from tenantware.metrics import MIGRATION_ROLLBACKS, SHADOW_CALLS
from tenantware.migration import (
    Comparison,
    ComparisonBook,
    Plan,
    ReportRow,
    Rollbacks,
    RuleTable,
    Trial,
    agreement,
    answer_of,
)
from tenantware.migration.tally import Tally, row_of
from tenantware.proxy.upstream import UpstreamTooLarge, UpstreamUnavailable
from tenantware.state import LiveConfig, Snapshot

if TYPE_CHECKING:
    from tenantware.config import MigrationCandidate
    from tenantware.metering.ledger.writer import LedgerWriter
    from tenantware.migration.redis import RedisReportStore
    from tenantware.proxy.dispatch import Dispatcher
    from tenantware.types import Message, Send

__all__ = ["SESSION", "SHADOW_OUTCOME", "MigrationRunner", "PrimaryCall"]

log = structlog.get_logger("tenantware.migration")

#: ``ctx.extra`` key: the client's session header value (the canary's sticky key).
SESSION: Final = "migration.session"
#: Ledger outcome of a shadow call.
SHADOW_OUTCOME: Final = SHADOW
#: Bytes of each answer kept for the comparison (the rest is measured, not compared).
_CAPTURE_BYTES: Final = 256 * 1024
_FAILED: Final = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR})
#: Seconds between two batches of counters (and rollbacks) sent to Redis.
FLUSH_S: Final = 1.0


class PrimaryCall:
    """The request's own (client-facing) call as the shadows of it see it: its answer's bytes
    (up to a bound), set when it is over."""

    __slots__ = ("canary_failed", "captured", "ctx", "done", "launched", "plan", "runner", "status")

    def __init__(self, ctx: RequestContext, plan: Plan, runner: MigrationRunner) -> None:
        self.ctx = ctx
        self.plan = plan
        self.runner = runner
        #: The canary's call failed before answering (the request moved on).
        self.canary_failed = False
        self.captured = bytearray()
        self.done = anyio.Event()
        self.launched = False
        #: The client's status (a refusal's, when the dispatcher raised).
        self.status = 0

    def attempt_failed(self, deployment: Deployment, elapsed_s: float) -> None:
        """A call of this request failed before answering: a canary's counts against it."""
        canary = self.plan.canary
        if (
            canary is not None
            and not self.canary_failed
            and deployment.upstream is not None
            and deployment.upstream.name == canary.upstream
            and deployment.model == canary.model
        ):
            self.canary_failed = True
            self.runner.canary_failed(canary, self.ctx, elapsed_s)

    def capturing(self, send: Send) -> Send:
        """``send`` that also keeps the first bytes of the answer."""
        captured = self.captured

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.body" and len(captured) < _CAPTURE_BYTES:
                captured.extend(message.get("body", b"")[: _CAPTURE_BYTES - len(captured)])
            await send(message)

        return capture


class MigrationRunner:
    """Plans, canary bookkeeping and shadow calls for one dispatcher."""

    def __init__(self, live: LiveConfig, *, writer: LedgerWriter | None = None) -> None:
        self.live = live
        self.writer = writer
        self.rollbacks = Rollbacks()
        self.book = ComparisonBook(live.current.config.migration.report_size)
        self.dispatcher: Dispatcher | None = None
        self._table: tuple[MigrationSettings | None, RuleTable] = (
            None,
            RuleTable(MigrationSettings()),
        )
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._group: anyio.abc.TaskGroup | None = None
        #: Shadow calls running now (for tests and shutdown checks).
        self.in_flight = 0
        #: Ledger record ids unique across processes (a client may reuse its request id).
        self._record_prefix = f"{os.urandom(6).hex()}-shadow-"
        self._records = itertools.count(1)
        #: The fleet's report and rollbacks (Redis), or ``None``: this process's book.
        self.shared: RedisReportStore | None = None
        #: Counters not yet sent to ``shared``.
        self.tally = Tally()
        #: Rollbacks judged here, not yet published.
        self._rolled_here: list[tuple[str, MigrationCandidate]] = []
        self._flush_lock = anyio.Lock()

    def _record_id(self) -> str:
        return f"{self._record_prefix}{next(self._records)}"

    # -- lifetime ------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The task group shadow calls run in; leaving it cancels those still running."""
        async with anyio.create_task_group() as group:
            self._group = group
            if self.shared is not None:
                group.start_soon(self._flush_forever)
            try:
                yield
            finally:
                self._group = None
                group.cancel_scope.cancel()
        if self.shared is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_S):
                await self.flush()  # what the last second counted

    async def _flush_forever(self) -> None:
        while True:
            await anyio.sleep(FLUSH_S)
            try:
                await self.flush()
            except Exception:  # a bug here must not end the gateway's task group
                log.exception("migration report flush failed")

    async def flush(self) -> None:
        """Send the counters and rollbacks of this process, take up the others' rollbacks.
        While Redis cannot be reached the counters wait here for the next round."""
        shared = self.shared
        if shared is None:
            return
        async with self._flush_lock:
            batch = self.tally.take()
            rolled, self._rolled_here = self._rolled_here, []
            try:
                await shared.add(batch)
                batch = {}
                while rolled:
                    key, candidate = rolled[0]
                    await shared.roll_back(key, candidate)
                    rolled.pop(0)
                elsewhere = await shared.rolled()
            except STORE_UNAVAILABLE as exc:
                self.tally.restore(batch)
                self._rolled_here[:0] = rolled
                log.debug("migration report not sent", error=type(exc).__name__)
                return
        trials = self.table(self.live.current).trials
        for key, candidate in elsewhere.items():
            trial = trials.get(key)
            # Only under the settings in force: an old rollback does not hold on new ones.
            if trial is not None and trial.candidate == candidate:
                self.rollbacks.adopt(key, candidate)

    async def report(
        self, *, since: float, until: float, rule: str | None
    ) -> tuple[list[ReportRow], bool]:
        """The report's rows, and whether they are the fleet's (else this process's)."""
        if self.shared is None:
            kept = self.book.report(
                since=since, until=until, rule=rule, rolled_back=self.report_rolled_back()
            )
            return kept, False
        await self.flush()  # this process's last counters, and the others' rollbacks
        rolled = set(self.report_rolled_back())
        totals = await self.shared.read(since=since, until=until, rule=rule)
        rows = [
            row_of(name, trial, fields, trial in rolled)
            for (name, trial), fields in sorted(totals.items())
        ]
        return rows, True

    # -- plans ---------------------------------------------------------------------------------

    def table(self, snapshot: Snapshot) -> RuleTable:
        settings = snapshot.config.migration
        held, table = self._table
        if held is not settings:
            table = RuleTable(settings)
            self._table = (settings, table)
            self.book.resize(settings.report_size)
        return table

    def plan(self, snapshot: Snapshot, ctx: RequestContext) -> Plan | None:
        table = self.table(snapshot)
        tenant = ctx.tenant
        if not table or tenant is None or ctx.model is None:
            return None
        session = ctx.extra.get(SESSION)
        return table.plan(
            ctx.model,
            tenant.id,
            tenant.tier,
            session,
            self.rollbacks.rolled_back,
            residency=tenant.data.residency,
        )

    def deployment(self, snapshot: Snapshot, upstream_name: str, model: str) -> Deployment | None:
        """The deployment of ``model`` on that upstream (one of the model's own when it
        serves it, so it shares their circuit), ``None`` when the upstream is gone."""
        assert self.dispatcher is not None
        for deployment in self.dispatcher.board.deployments(snapshot, model):
            if deployment.upstream is not None and deployment.upstream.name == upstream_name:
                return deployment
        for upstream in snapshot.config.upstreams:
            if upstream.name == upstream_name:
                return Deployment(model, upstream)
        return None

    # -- what the dispatcher reports ---------------------------------------------------------

    def canary_failed(self, trial: Trial, ctx: RequestContext, latency_s: float) -> None:
        """A canary call that failed before answering (the request moved on to the primary)."""
        self._canary(trial, ctx, ok=False, status=502, latency_s=latency_s)

    def served(self, primary: PrimaryCall, canary_served: bool) -> None:
        """The request is over: count it for its target's window and let its shadows compare."""
        ctx, plan = primary.ctx, primary.plan
        ok = not _failed(primary.status, ctx.outcome)
        latency = ctx.upstream_latency_s if ctx.upstream_latency_s is not None else ctx.elapsed()
        if canary_served and plan.canary is not None:
            self._canary(plan.canary, ctx, ok=ok, status=primary.status, latency_s=latency)
        else:
            window_s = self.live.current.config.breaker.deployment.window_s
            self.rollbacks.record_primary(plan.rule, ok, latency, window_s)
        primary.done.set()

    def _canary(
        self, trial: Trial, ctx: RequestContext, *, ok: bool, status: int, latency_s: float
    ) -> None:
        window_s = self.live.current.config.breaker.deployment.window_s
        self._judge(trial, ok, latency_s, window_s)
        usage = ctx.usage or Usage()
        self._add(
            Comparison(
                kind="canary",
                ts=ctx.unix_time,
                rule=trial.rule.name,
                trial=trial.key,
                tenant=ctx.tenant_id or "",
                request_id=ctx.request_id,
                stream=bool(ctx.view and ctx.view.stream),
                status=status,
                outcome="ok" if ok else "error",
                latency_s=latency_s,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            )
        )

    def _judge(self, trial: Trial, ok: bool, latency_s: float, window_s: float) -> None:
        reason = self.rollbacks.record_candidate(trial, ok, latency_s, window_s)
        if reason is not None:
            MIGRATION_ROLLBACKS.labels(trial.key).inc()
            if self.shared is not None:
                self._rolled_here.append((trial.key, trial.candidate))

    def _add(self, comparison: Comparison) -> None:
        if self.shared is not None:
            self.tally.add(comparison)
        else:
            self.book.add(comparison)

    # -- shadows -------------------------------------------------------------------------------

    def launch(self, primary: PrimaryCall, snapshot: Snapshot, path: str) -> None:
        """Start the shadow copies of this request (once, after its primary call was sent)."""
        if primary.launched:
            return
        primary.launched = True
        size = snapshot.config.migration.shadow_concurrency
        for trial in primary.plan.shadows:
            limiter = self._limiters.get(trial.key)
            if limiter is None:
                limiter = self._limiters[trial.key] = anyio.CapacityLimiter(size)
            elif limiter.total_tokens != size:
                limiter.total_tokens = size
            token = object()
            group = self._group
            try:
                if group is None:
                    raise anyio.WouldBlock  # not running (no lifespan): nothing may outlive
                limiter.acquire_on_behalf_of_nowait(token)
            except anyio.WouldBlock:
                if self.shared is not None:
                    self.tally.dropped(trial.rule.name, trial.key, time.time())
                else:
                    self.book.dropped[trial.key] += 1
                SHADOW_CALLS.labels(trial.key, "dropped").inc()
                continue
            self.in_flight += 1
            group.start_soon(self._shadow, trial, primary, snapshot, path, limiter, token)

    async def _shadow(
        self,
        trial: Trial,
        primary: PrimaryCall,
        snapshot: Snapshot,
        path: str,
        limiter: anyio.CapacityLimiter,
        token: object,
    ) -> None:
        try:
            await self._shadow_call(trial, primary, snapshot, path)
        except Exception:  # a bug in the comparison must not end the gateway's task group
            log.exception("shadow call failed", trial=trial.key)
        finally:
            self.in_flight -= 1
            limiter.release_on_behalf_of(token)

    async def _shadow_call(
        self, trial: Trial, primary: PrimaryCall, snapshot: Snapshot, path: str
    ) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        ctx = primary.ctx
        view = ctx.view
        assert view is not None
        settings = snapshot.config.migration
        USAGE_BOUNDS.set(UsageBounds.for_request(ctx, snapshot.config.metering.max_output_tokens))
        deployment = self.deployment(snapshot, trial.upstream, trial.model)
        started = time.perf_counter()
        status, outcome, first_at = 0, "error", None
        usage: Usage | None = None
        captured = bytearray()
        stream = view.stream
        try:
            if deployment is None:
                raise GatewayError(502, "the candidate upstream is gone")
            call = dispatcher.request_for(ctx, snapshot, deployment, path)
            target, adapter = call.target, call.adapter
            with anyio.fail_after(settings.shadow_timeout_s):
                response = await dispatcher.client.request(
                    "POST",
                    call.url,
                    headers=call.headers,
                    body=call.body,
                    timeouts=target.stream_timeouts if stream else target.whole_timeouts,
                )
                try:
                    status = response.status
                    content_type = response.header("content-type") or "text/event-stream"
                    limit = target.upstream.max_response_bytes
                    if stream and status < 400 and "event-stream" in content_type:
                        tap: Any = (
                            adapter.tap(ctx, include_usage=call.wants_usage)
                            if adapter
                            else StreamTap(hide_usage=not call.wants_usage)
                        )
                        left = limit
                        while chunk := await response.read_chunk():
                            if first_at is None:
                                first_at = time.perf_counter()
                            left -= len(chunk)
                            if left < 0:
                                raise UpstreamTooLarge(limit)
                            _keep(captured, tap.feed(chunk))
                        _keep(captured, tap.flush())
                        usage = tap.usage or Usage(
                            input_tokens=ctx.estimated_prompt_tokens,
                            output_tokens=tap.estimated_output_tokens(),
                            estimated=True,
                        )
                    else:
                        data = await response.read(limit)
                        if status < 400:
                            usage = adapter.usage(data) if adapter else parse_json_usage(data)[0]
                        if adapter is not None:
                            data = adapter.answer(ctx, status, data, usage)
                        _keep(captured, data)
                finally:
                    closing = response.close_now()
                    if closing is not None:
                        with anyio.CancelScope(shield=True):
                            await closing
            outcome = "error" if _failed(status, None) else "ok"
        except TimeoutError:
            outcome = "timeout"
        except (UpstreamUnavailable, UpstreamTooLarge, GatewayError):
            outcome = "error"
        latency = time.perf_counter() - started
        SHADOW_CALLS.labels(trial.key, outcome).inc()
        billed = usage if outcome == "ok" else None
        price = snapshot.catalogue.price(trial.model)
        cost = (
            cost_nanousd(
                price,
                billed.input_tokens,
                billed.output_tokens,
                billed.cached_tokens,
                billed.cache_write_tokens,
            )
            if billed is not None and price is not None
            else 0
        )
        ttft = first_at - started if first_at is not None else None
        if self.writer is not None:
            self.writer.submit(
                UsageRecord(
                    record_id=self._record_id(),
                    request_id=ctx.request_id,
                    ts=ctx.unix_time,
                    tenant=ctx.tenant_id or "",
                    key_id=ctx.key_id or "",
                    model_requested=ctx.model or "",
                    model_served=trial.model,
                    upstream=trial.upstream,
                    status=status,
                    outcome=SHADOW_OUTCOME,
                    input_tokens=billed.input_tokens if billed else 0,
                    output_tokens=billed.output_tokens if billed else 0,
                    cached_tokens=billed.cached_tokens if billed else 0,
                    reasoning_tokens=billed.reasoning_tokens if billed else 0,
                    cost_nanousd=cost,
                    charged_nanousd=0,
                    upstream_latency_s=latency,
                    latency_s=latency,
                    ttft_s=ttft,
                    stream=stream,
                    estimated=bool(billed and billed.estimated),
                    usage_invalid=bool(billed and billed.anomalies),
                )
            )
        self._judge(trial, outcome == "ok", latency, snapshot.config.breaker.deployment.window_s)
        await primary.done.wait()
        self._compare(
            trial, primary, snapshot, outcome, status, latency, ttft, billed, cost, captured
        )

    def _compare(
        self,
        trial: Trial,
        primary: PrimaryCall,
        snapshot: Snapshot,
        outcome: str,
        status: int,
        latency: float,
        ttft: float | None,
        usage: Usage | None,
        cost: int,
        captured: bytearray,
    ) -> None:
        ctx = primary.ctx
        stream = bool(ctx.view and ctx.view.stream)
        primary_usage = ctx.usage or Usage()
        primary_ok = 0 < primary.status < 400 and ctx.outcome not in _FAILED
        answered = outcome == "ok" and 0 < status < 400
        exact = similarity = same_tools = None
        if answered and primary_ok:
            exact, similarity, same_tools = agreement(
                answer_of(bytes(primary.captured), stream=_is_stream(primary.captured)),
                answer_of(bytes(captured), stream=_is_stream(captured)),
            )
        served = ctx.model_served or ctx.model
        price = snapshot.catalogue.price(served) if served else None
        primary_cost = ctx.cost_nanousd
        if primary_cost is None:
            primary_cost = (
                cost_nanousd(
                    price,
                    primary_usage.input_tokens,
                    primary_usage.output_tokens,
                    primary_usage.cached_tokens,
                    primary_usage.cache_write_tokens,
                )
                if price is not None and primary_ok
                else 0
            )
        first = ctx.first_byte_at
        self._add(
            Comparison(
                kind="shadow",
                ts=ctx.unix_time,
                rule=trial.rule.name,
                trial=trial.key,
                tenant=ctx.tenant_id or "",
                request_id=ctx.request_id,
                stream=stream,
                status=status,
                outcome=outcome,
                latency_s=latency,
                ttft_s=ttft,
                input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
                cost_nanousd=cost,
                primary_status=primary.status,
                primary_outcome="error" if _failed(primary.status, ctx.outcome) else "ok",
                primary_latency_s=(
                    ctx.upstream_latency_s if ctx.upstream_latency_s is not None else 0.0
                ),
                primary_ttft_s=(first - ctx.started_at) if first is not None else None,
                primary_input_tokens=primary_usage.input_tokens if primary_ok else 0,
                primary_output_tokens=primary_usage.output_tokens if primary_ok else 0,
                primary_cost_nanousd=primary_cost,
                exact=exact,
                similarity=similarity,
                same_tools=same_tools,
            )
        )

    def report_rolled_back(self) -> list[str]:
        """Keys of the trials rolled back under their current settings."""
        table = self.table(self.live.current)
        return [key for key, trial in table.trials.items() if self.rollbacks.rolled_back(trial)]


def _failed(status: int, outcome: str | None) -> bool:
    """Whether a call counts as the target's failure: no answer, 429, 5xx, or a stream cut
    after a 2xx. A 4xx refusal is the request's fault, not the target's."""
    if status == 0 or status == 429 or status >= 500:
        return True
    if status >= 400:
        return False
    return outcome in _FAILED


def _is_stream(captured: bytearray) -> bool:
    """Whether captured answer bytes are SSE (a stream may be answered with a whole JSON)."""
    return not captured.lstrip().startswith(b"{")


def _keep(captured: bytearray, data: bytes) -> None:
    if data and len(captured) < _CAPTURE_BYTES:
        captured.extend(data[: _CAPTURE_BYTES - len(captured)])
