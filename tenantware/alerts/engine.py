"""The alert engine: counts records off the request path, judges the rules on a timer,
keeps each alert firing once while its condition holds, and hands messages to delivery.

Every replica, every ``evaluate_every_s``: adds the counts its ledger writer gathered to the
store, reports its facts (circuits out of service, ledger failing), then tries the lease.
The replica holding it judges every rule over the summed windows and facts, compares with
the alerts firing (kept in the store, so a new lease holder knows them), records ``fired``
and ``resolved`` in the history and delivers. ``store_failover`` is judged by each replica
for itself: a replica that cannot reach the store cannot take a lease either.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Final, Literal

import anyio
import httpx
import structlog

from tenantware.alerts.delivery import Dispatcher
from tenantware.alerts.model import Alert, AlertEvent, EventKind, Finding, TenantWebhook
from tenantware.alerts.payload import Message, Status
from tenantware.alerts.probes import (
    CIRCUIT_FACT,
    LEDGER_FACT,
    Probe,
    ProbeInput,
    balance_probe,
    circuit_probe,
    duration_probe,
    spend_probe,
)
from tenantware.alerts.rules import WindowRule, default_summary, rules_in_force
from tenantware.alerts.store import AlertStore
from tenantware.alerts.webhooks import as_destination, new_webhook
from tenantware.alerts.window import Counts, WindowCounters
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.failover import StoreHealth
from tenantware.breaker.board import BreakerBoard
from tenantware.config import WINDOW_KINDS, AlertRule, AlertSettings
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.ledger.writer import LedgerWriter
from tenantware.quota.store import QuotaStore
from tenantware.state import LiveConfig, Snapshot

__all__ = ["AlertEngine"]

log = structlog.get_logger("tenantware.alerts")

#: Facts of a replica older than this many evaluation intervals are ignored (it stopped).
_FACT_INTERVALS: Final = 3.0
#: Longest a tick waits for the store before giving up until the next one.
_MAX_STORE_WAIT_S: Final = 5.0


class _Compiled:
    """The rules of one configuration version."""

    __slots__ = ("longest_s", "rules", "version", "window")

    def __init__(self, snapshot: Snapshot, settings: AlertSettings) -> None:
        self.version = snapshot.version
        self.rules = rules_in_force(settings)
        tiers = {tenant.id: tenant.tier for tenant in snapshot.registry.tenants()}
        self.window = tuple(WindowRule(r, tiers) for r in self.rules if r.kind in WINDOW_KINDS)
        self.longest_s = max((r.window_s for r in self.rules if r.kind in WINDOW_KINDS), default=0)


class AlertEngine:
    """``AlertEngine(live, store, ...)``; ``running()`` for the gateway's lifetime, and
    ``observer`` among the ledger writer's observers."""

    def __init__(
        self,
        live: LiveConfig,
        store: AlertStore,
        *,
        board: BreakerBoard | None = None,
        writer: LedgerWriter | None = None,
        store_health: StoreHealth | None = None,
        quota_store: QuotaStore | None = None,
        replica: str | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.live = live
        self.store = store
        self.board = board
        self.writer = writer
        self.store_health = store_health
        self.clock = clock
        #: This process among the replicas (the lease holder's name, its facts' key).
        self.replica = replica or secrets.token_hex(6)
        settings = live.current.config.alerts
        self.counters = WindowCounters(settings.bucket_s)
        self.probes: dict[str, Probe] = {
            "circuit_open": circuit_probe,
            "ledger_spilling": duration_probe(LEDGER_FACT),
        }
        if quota_store is not None:
            self.probes["spend"] = spend_probe(quota_store)
            self.probes["balance"] = balance_probe(quota_store)
        self._client = client
        #: Delivery, while ``running()``; destinations are read once, at start (a change
        #: needs a restart).
        self.dispatcher: Dispatcher | None = None
        self._compiled: _Compiled | None = None
        #: ``store_failover`` alerts of this replica (judged here, not under the lease).
        self._local_active: dict[str, Alert] = {}
        self._store_down_since: float | None = None
        self._store_failing = False
        #: History entries the store could not take yet (oldest dropped past the bound).
        self._unrecorded: deque[AlertEvent] = deque(maxlen=settings.history_size)
        self.leader = False

    def add_probe(self, kind: str, probe: Probe) -> None:
        """Judge rules of ``kind`` with ``probe`` (how another package adds a kind)."""
        self.probes[kind] = probe

    # -- counting (ledger writer, per flushed batch) --------------------------------------

    def _rules(self, snapshot: Snapshot) -> _Compiled:
        compiled = self._compiled
        if compiled is None or compiled.version != snapshot.version:
            compiled = self._compiled = _Compiled(snapshot, snapshot.config.alerts)
        return compiled

    def observe(self, records: Sequence[UsageRecord]) -> None:
        """The ledger writer's observer: adds a batch to this process's window counts."""
        rules = self._rules(self.live.current).window
        if rules:
            self.counters.observe(records, rules)

    # -- the timer -----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AlertEngine]:
        client = self._client or httpx.AsyncClient()
        settings = self.live.current.config.alerts
        dispatcher = self.dispatcher = Dispatcher(settings, client, self._record)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(dispatcher.run)
                group.start_soon(self._loop)
                try:
                    yield self
                finally:
                    group.cancel_scope.cancel()
        finally:
            self.dispatcher = None
            with anyio.CancelScope(shield=True):
                await dispatcher.aclose()
                await self._release()
                if self._client is None:
                    await client.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("alert evaluation failed")
            await anyio.sleep(self.live.current.config.alerts.evaluate_every_s)

    async def _release(self) -> None:
        if not self.leader:
            return
        with anyio.move_on_after(1.0):
            with suppress(*STORE_UNAVAILABLE):
                await self.store.release(self.replica)

    async def tick(self) -> None:
        """One round: share counts and facts, judge the rules if this replica holds the lease."""
        now = self.clock()
        snapshot = self.live.current
        settings = snapshot.config.alerts
        compiled = self._rules(snapshot)
        counts = self.counters.take()
        oldest = int((now - compiled.longest_s) // settings.bucket_s) - 1
        await self._judge_local(compiled.rules, settings, now)
        try:
            with anyio.fail_after(min(_MAX_STORE_WAIT_S, settings.lease_s / 2)):
                await self.store.add_counts(
                    counts,
                    oldest_bucket=oldest,
                    ttl_s=compiled.longest_s + 2 * settings.bucket_s,
                )
                counts = {}
                await self.store.report_facts(self.replica, self._local_facts(now), now)
                while self._unrecorded:
                    await self.store.record(self._unrecorded[0], settings.history_size)
                    self._unrecorded.popleft()
                self.leader = await self.store.acquire(self.replica, settings.lease_s)
                if self.leader:
                    if settings.tenant_webhooks and self.dispatcher is not None:
                        registered = await self.store.webhooks()
                        self.dispatcher.sync([as_destination(w) for w in registered])
                    await self._evaluate(snapshot, compiled, settings, now)
        except STORE_UNAVAILABLE as exc:
            self.counters.give_back(counts, oldest)
            if not self._store_failing:
                log.warning("alert store unavailable", error=type(exc).__name__)
            self._store_failing = True
            return
        if self._store_failing:
            log.info("alert store available again")
        self._store_failing = False

    def _local_facts(self, now: float) -> dict[str, float]:
        facts: dict[str, float] = {}
        if self.board is not None:
            for key, since in self.board.out_since.items():
                facts[CIRCUIT_FACT + key] = since
        if self.writer is not None:
            health = self.writer.health()
            if health.failing_s > 0 and (health.pending or health.spilled):
                facts[LEDGER_FACT] = now - health.failing_s
        return facts

    # -- judging -------------------------------------------------------------------------

    async def _evaluate(
        self, snapshot: Snapshot, compiled: _Compiled, settings: AlertSettings, now: float
    ) -> None:
        counts: Counts = {}
        bucket_s = settings.bucket_s
        if compiled.window:
            first = int((now - compiled.longest_s) // bucket_s)
            counts = await self.store.read_counts(first, int(now // bucket_s))
        facts = await self.store.facts(now, _FACT_INTERVALS * settings.evaluate_every_s + 1.0)
        given = ProbeInput(snapshot, facts, now)
        found: dict[str, tuple[AlertRule, Finding]] = {}
        for window_rule in compiled.window:
            rule = window_rule.rule
            for finding in _window_findings(window_rule, counts, now, bucket_s):
                found[f"{rule.id}:{finding.group}"] = (rule, finding)
        for rule in compiled.rules:
            probe = self.probes.get(rule.kind)
            if rule.kind in WINDOW_KINDS or rule.kind == "store_failover" or probe is None:
                continue
            for finding in await probe(rule, given):
                found[f"{rule.id}:{finding.group}"] = (rule, finding)
        active = await self.store.active()
        for fingerprint, (rule, finding) in found.items():
            if finding.firing and fingerprint not in active:
                alert = _alert(fingerprint, rule, finding, now)
                await self.store.set_active(alert)
                await self._announce(alert, "firing", now)
        for fingerprint, alert in active.items():
            current = found.get(fingerprint)
            if current is None or not current[1].firing:
                await self.store.clear_active(fingerprint)
                await self._announce(alert, "resolved", now)

    async def _judge_local(
        self, rules: Sequence[AlertRule], settings: AlertSettings, now: float
    ) -> None:
        """``store_failover``: this replica's own view of the shared store."""
        down = self._store_failing or (self.store_health is not None and self.store_health.down)
        if not down:
            self._store_down_since = None
        elif self._store_down_since is None:
            self._store_down_since = now
        since = self._store_down_since
        firing: set[str] = set()
        for rule in rules:
            if rule.kind != "store_failover":
                continue
            fingerprint = f"{rule.id}:{self.replica}"
            held = 0.0 if since is None else now - since
            if since is None or held < rule.threshold:
                continue
            firing.add(fingerprint)
            if fingerprint not in self._local_active:
                alert = _alert(fingerprint, rule, Finding(self.replica, None, held, True), now)
                self._local_active[fingerprint] = alert
                await self._announce(alert, "firing", now)
        for fingerprint in [f for f in self._local_active if f not in firing]:
            await self._announce(self._local_active.pop(fingerprint), "resolved", now)

    async def _announce(self, alert: Alert, status: Status, now: float) -> None:
        event: EventKind = "fired" if status == "firing" else "resolved"
        log.warning(f"alert {event}", rule=alert.rule, group=alert.group, value=alert.value)
        await self._record(
            AlertEvent(
                id=secrets.token_hex(8),
                ts=now,
                event=event,
                fingerprint=alert.fingerprint,
                rule=alert.rule,
                tenant=alert.tenant,
                status=status,
                value=alert.value,
            )
        )
        resolved_at = now if status == "resolved" else None
        message = Message(
            id=secrets.token_hex(12), status=status, alert=alert, resolved_at=resolved_at
        )
        if self.dispatcher is not None:
            await self.dispatcher.submit(message)

    async def _record(self, event: AlertEvent) -> None:
        keep = self.live.current.config.alerts.history_size
        try:
            with anyio.fail_after(_MAX_STORE_WAIT_S):
                await self.store.record(event, keep)
        except STORE_UNAVAILABLE:
            self._unrecorded.append(event)

    # -- tenants' webhooks (admin API) -----------------------------------------------------

    async def webhooks(self, tenant: str) -> list[TenantWebhook]:
        """``tenant``'s registered webhooks (with their secrets: callers leave them out)."""
        return sorted(
            (w for w in await self.store.webhooks() if w.tenant == tenant),
            key=lambda w: w.created_at,
        )

    async def register_webhook(
        self,
        tenant: str,
        url: str,
        *,
        fmt: Literal["json", "slack"] = "json",
        min_severity: Literal["info", "warning", "critical"] = "info",
    ) -> TenantWebhook:
        """Register a webhook of ``tenant`` (``WebhookRefused`` says why not); delivery to it
        starts at the next evaluation."""
        settings = self.live.current.config.alerts
        existing = len(await self.webhooks(tenant))
        webhook = new_webhook(
            settings, tenant, url, existing=existing, fmt=fmt, min_severity=min_severity
        )
        await self.store.put_webhook(webhook)
        return webhook

    async def delete_webhook(self, tenant: str, webhook_id: str) -> bool:
        """Remove ``tenant``'s webhook ``webhook_id``; ``False`` when it has none by that id."""
        if not any(w.id == webhook_id for w in await self.webhooks(tenant)):
            return False
        return await self.store.delete_webhook(webhook_id)

    # -- reading -------------------------------------------------------------------------

    async def history(self, *, limit: int, tenant: str | None = None) -> list[AlertEvent]:
        """The newest entries, newest first (only ``tenant``'s when given)."""
        keep = self.live.current.config.alerts.history_size
        stored = await self.store.history(keep if tenant is not None else limit)
        entries = sorted([*self._unrecorded, *stored], key=lambda e: e.ts, reverse=True)
        if tenant is not None:
            entries = [e for e in entries if e.tenant == tenant]
        return entries[:limit]

    async def active(self, *, tenant: str | None = None) -> list[Alert]:
        """The alerts firing now (this replica's store alerts included)."""
        alerts = [*(await self.store.active()).values(), *self._local_active.values()]
        if tenant is not None:
            alerts = [a for a in alerts if a.tenant == tenant]
        return sorted(alerts, key=lambda a: a.started_at)


def _window_findings(
    rule: WindowRule, counts: Counts, now: float, bucket_s: float
) -> list[Finding]:
    first = int((now - rule.rule.window_s) // bucket_s)
    sums: dict[str, list[int]] = {}
    rule_id = rule.rule.id
    for (owner, group, bucket), (judged, bad) in counts.items():
        if owner != rule_id or bucket < first:
            continue
        entry = sums.setdefault(group, [0, 0])
        entry[0] += judged
        entry[1] += bad
    findings = []
    for group, (judged, bad) in sums.items():
        value, firing = rule.firing(judged, bad)
        tenant = group if rule.rule.scope == "tenant" else None
        findings.append(Finding(group, tenant, value, firing))
    return findings


def _alert(fingerprint: str, rule: AlertRule, finding: Finding, now: float) -> Alert:
    return Alert(
        fingerprint=fingerprint,
        rule=rule.id,
        kind=rule.kind,
        severity=rule.severity,
        scope=rule.scope,
        group=finding.group,
        tenant=finding.tenant,
        summary=default_summary(rule),
        value=finding.value,
        threshold=rule.threshold,
        started_at=now,
    )
