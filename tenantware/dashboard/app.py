"""``DashboardApp``: the dashboard page and its JSON, one ASGI app for these paths:

- ``GET /dashboard``: the page (static HTML, CSS and JS from this package; no build step, no
  CDN). It asks for a key once, keeps it in ``sessionStorage`` (this tab only, gone when it
  closes) and sends it as ``Authorization: Bearer``: never in a URL or a cookie.
- ``GET /admin/dashboard/usage?range=&since=&until=&tenant=``: usage figures for a time range
  (``UsageView``), aggregated by the ledger (in SQL for SQLite and PostgreSQL). A tenant key
  sees its own tenant only (another tenant's id is answered 404, like the admin API: it must
  not learn which tenants exist); an admin or read-only key sees every tenant.
- ``GET /admin/dashboard/live``: breakers, admission queues, store and ledger health
  (``LiveView``); admin and read-only keys only.
- ``GET /admin/dashboard/migration?range=&since=&until=``: the shadow/canary comparison of
  the migration rules (``MigrationView``); admin and read-only keys only.

Every answer carries a strict Content-Security-Policy (scripts and styles from this origin
only, nothing inline, no framing) and is never cached. Nothing here changes state, so a
read-only key can change nothing through it.

Charts are drawn by uPlot, vendored as one minified file (``static/vendor``, MIT licence
alongside): about 50 kB, no dependencies, canvas time series that stay fast for thousands of
points, and it sets styles through the DOM, which a CSP without ``'unsafe-inline'`` allows.
Server-rendered SVG would need a hand-written axis, scale and tick layer here, to be kept up by
us; a page that re-renders on every refresh also wants the data as JSON anyway (the endpoints
are usable without the page). Bars (shares per tenant, model, cost center) are plain HTML
table rows with a ``<meter>``, so screen readers read the numbers.
"""

from __future__ import annotations

import functools
import math
import time
from importlib import resources
from typing import Final
from urllib.parse import parse_qsl

import anyio.to_thread
import msgspec

from tenantware.admin.auth import AdminAuth, Caller
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.dashboard.live import LiveSources
from tenantware.dashboard.migration import migration_view
from tenantware.dashboard.schemas import UsageView
from tenantware.errors import send_error
from tenantware.metering.ledger.base import Ledger, LedgerUnavailable
from tenantware.metering.reports import (
    Dimension,
    Period,
    ReportRow,
    display_amount,
    parse_time,
    usage_report,
)
from tenantware.state import LiveConfig
from tenantware.types import Receive, Scope, Send

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DASHBOARD_API_PREFIX",
    "DASHBOARD_PATH",
    "DashboardApp",
    "is_dashboard_path",
]

DASHBOARD_PATH: Final = "/dashboard"
DASHBOARD_API_PREFIX: Final = "/admin/dashboard/"
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Named ranges of the page's selector, in seconds.
RANGES: Final = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
#: The longest custom range (a year), and the most points one series may have.
MAX_RANGE_S: Final = 366 * 86400
_WIDTHS: Final[tuple[tuple[Period, int], ...]] = (("minute", 60), ("hour", 3600), ("day", 86400))
_MAX_POINTS: Final = 800
#: The most rows of an every-tenant series (tenants x points): a month by hour of every
#: tenant is built row by row in Python, so the operator's view widens its period instead.
_MAX_OPERATOR_ROWS: Final = 4000
_FILES: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uPlot.LICENSE": "text/plain; charset=utf-8",
}
_HEADERS: Final = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_encode = msgspec.json.Encoder().encode
_UNAVAILABLE: Final[tuple[type[Exception], ...]] = (LedgerUnavailable, *STORE_UNAVAILABLE)


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is one of ``DashboardApp``'s (route these to it)."""
    return path == DASHBOARD_PATH or path.startswith((DASHBOARD_PATH + "/", DASHBOARD_API_PREFIX))


class _BadQuery(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _load(name: str) -> bytes:
    return resources.files("tenantware.dashboard").joinpath("static", name).read_bytes()


def pick_period(span_s: float, series: int = 1) -> tuple[Period, int]:
    """The narrowest period that keeps ``series`` series under ``_MAX_POINTS`` points each
    and under ``_MAX_OPERATOR_ROWS`` points together."""
    points = min(_MAX_POINTS, _MAX_OPERATOR_ROWS // max(1, series))
    for period, width in _WIDTHS:
        if span_s / width <= points:
            return period, width
    return _WIDTHS[-1]


def time_range(query: dict[str, str], *, now: float) -> tuple[float, float]:
    """``range`` (``1h``, ``24h``, ``7d``, ``30d``; default 24h) or ``since``/``until``."""
    named = query.get("range")
    if named is not None and named not in RANGES:
        raise _BadQuery(f"range must be one of {', '.join(RANGES)}", "range")
    try:
        until = parse_time(query["until"], now=now) if query.get("until") else now
    except ValueError as exc:
        raise _BadQuery(str(exc), "until") from None
    try:
        if query.get("since") and named is None:
            since = parse_time(query["since"], now=now)
        else:
            since = until - RANGES[named or "24h"]
    except ValueError as exc:
        raise _BadQuery(str(exc), "since") from None
    if not (math.isfinite(since) and math.isfinite(until)) or since >= until:
        raise _BadQuery("since must be before until", "since")
    if until - since > MAX_RANGE_S:
        raise _BadQuery("a range may cover at most 366 days", "since")
    return since, until


class DashboardApp:
    """``DashboardApp(live=live, ledger=ledger, sources=sources)``: serves the paths above
    (absolute paths: route ``/dashboard`` and ``/admin/dashboard/`` to it)."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        ledger: Ledger | None,
        sources: LiveSources | None = None,
        auth: AdminAuth | None = None,
    ) -> None:
        self.live = live
        self.ledger = ledger
        self.sources = sources
        self.auth = auth or AdminAuth(live)
        self._page = _load("index.html")
        self._files = {name: (_load(name), kind.encode()) for name, kind in _FILES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _error(send, 405, "Only GET is supported here.", "method_not_allowed")
            return
        if path in (DASHBOARD_PATH, DASHBOARD_PATH + "/"):
            await _respond(send, 200, b"text/html; charset=utf-8", self._page)
            return
        static = DASHBOARD_PATH + "/static/"
        if path.startswith(static) and path[len(static) :] in self._files:
            body, kind = self._files[path[len(static) :]]
            await _respond(send, 200, kind, body)
            return
        if path.startswith(DASHBOARD_API_PREFIX):
            await self._api(scope, path[len(DASHBOARD_API_PREFIX) :], send)
            return
        await _error(send, 404, f"Unknown request URL: GET {path}.", "unknown_url")

    async def _api(self, scope: Scope, name: str, send: Send) -> None:
        if name not in ("usage", "live", "migration"):
            await _error(send, 404, f"Unknown request URL: GET {scope['path']}.", "unknown_url")
            return
        caller = self.auth.identify(scope)
        if caller is None:
            await _error(
                send, 401, "A valid admin or tenant API key is required.", "invalid_api_key"
            )
            return
        try:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        except UnicodeDecodeError:
            query = {}
        try:
            if name == "live":
                await self._live(caller, send)
            elif name == "migration":
                await self._migration(caller, query, send)
            else:
                await self._usage(caller, query, send)
        except _BadQuery as exc:
            await _error(send, 400, str(exc), "invalid_query", param=exc.param)
        except _UNAVAILABLE:
            await send_error(
                send,
                503,
                "The usage ledger cannot be read now; retry shortly.",
                type="server_error",
                code="ledger_unavailable",
                retry_after=1,
                headers=_HEADERS,
            )

    async def _live(self, caller: Caller, send: Send) -> None:
        if caller.role == "tenant" or self.sources is None:
            await _error(
                send, 403, "This key may not read the gateway's state.", "permission_denied"
            )
            return
        view = await self.sources.view()
        await _respond(send, 200, b"application/json", _encode(view))

    async def _migration(self, caller: Caller, query: dict[str, str], send: Send) -> None:
        source = self.sources.migration if self.sources is not None else None
        if caller.role == "tenant" or source is None:
            await _error(
                send, 403, "This key may not read the migration trials.", "permission_denied"
            )
            return
        since, until = time_range(query, now=time.time())
        period, width = pick_period(until - since)
        shared_rows = None
        if source.report is not None:
            try:
                rows, shared = await source.report(since=since, until=until, rule=None)
            except _UNAVAILABLE:
                await _error(
                    send,
                    503,
                    "The shared migration report cannot be reached; retry shortly.",
                    "report_unavailable",
                )
                return
            shared_rows = rows if shared else None
        # A full book takes a while to sum: off the event loop, over a copy of it.
        view = await anyio.to_thread.run_sync(
            functools.partial(
                migration_view,
                source.snapshot(),
                self.live.current.config.migration,
                since=since,
                until=until,
                period=period,
                width=width,
                shared_rows=shared_rows,
            )
        )
        await _respond(send, 200, b"application/json", _encode(view))

    async def _usage(self, caller: Caller, query: dict[str, str], send: Send) -> None:
        since, until = time_range(query, now=time.time())
        tenant = query.get("tenant") or None
        if caller.role == "tenant":
            if tenant is not None and tenant != caller.tenant:
                await _error(send, 404, f"No tenant {tenant!r}.", "tenant_not_found")
                return
            tenant = caller.tenant
        series = 1 if tenant is not None else len(self.live.current.config.tenants) or 1
        period, width = pick_period(until - since, series)
        settings = self.live.current.config.metering
        ledger = self.ledger

        async def report(period: Period, by: Dimension = "tenant") -> list[ReportRow]:
            if ledger is None:  # metering disabled
                return []
            return await usage_report(
                ledger,
                tenant=tenant,
                since=since,
                until=until,
                period=period,
                by=by,
                currency=settings.currency,
                currency_per_usd=settings.currency_per_usd,
            )

        totals = await report("all")
        view = UsageView(
            scope="tenant" if caller.role == "tenant" else "operator",
            tenant=tenant,
            since=since,
            until=until,
            period=period,  # type: ignore[arg-type]
            bucket_s=width,
            currency=settings.currency,
            charged=display_amount(
                sum(row.charged_nanousd for row in totals), settings.currency_per_usd
            ),
            totals=totals,
            series=await report(period),
            by_model=await report("all", "model"),
            by_cost_center=await report("all", "cost_center"),
        )
        await _respond(send, 200, b"application/json", _encode(view))


async def _respond(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send, status: int, message: str, code: str, *, param: str | None = None
) -> None:
    await send_error(
        send,
        status,
        message,
        type="invalid_request_error",
        code=code,
        param=param,
        headers=_HEADERS,
    )
