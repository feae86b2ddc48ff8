"""Usage endpoints: ``/admin/...`` for operators, ``/v1/usage`` for a tenant's own key,
``/metrics`` for Prometheus.

- ``GET /admin/usage?tenant=&since=&until=&period=&by=&format=`` needs the admin key
  (``metering.admin_key_hash``); without ``tenant`` it covers every tenant.
- ``GET /v1/usage?since=&until=&period=&format=`` is served behind ``TenantMiddleware``: the
  tenant comes from the key, never from the query; naming another tenant is refused (403).
- ``period`` is ``minute``, ``hour``, ``day`` (default), ``month`` or ``all`` (one row for
  the whole range); ``by`` is ``tenant`` (default), ``model`` or ``cost_center``.
- ``format`` is ``json`` (report rows), ``csv`` (the same rows) or ``records`` (every record
  as CSV, for chargeback). ``since`` defaults to 30 days ago.
- ``GET /metrics`` is the Prometheus exposition; it shows every tenant, so it needs the admin
  key unless ``metering.metrics_require_admin`` is false.
- ``GET /readyz`` (no key: load balancers and orchestrators probe it) is 200 while every
  check passes and 503 with the reasons when one does not. The usage ledger passes while it
  takes writes or, when it is stuck, while its spill file can take the records instead; the
  gateway adds its own checks (started and not draining, configuration, stores). The JSON
  body names each part and its state, never a URL.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec

from tenantware.context import context_of
from tenantware.errors import send_error
from tenantware.metering.ledger.base import Ledger
from tenantware.metering.ledger.writer import LedgerWriter
from tenantware.metering.reports import (
    DIMENSIONS,
    PERIODS,
    Dimension,
    Period,
    parse_time,
    records_csv,
    report_csv,
    usage_report,
)
from tenantware.metrics import exposition
from tenantware.state import LiveConfig
from tenantware.types import Receive, Scope, Send

__all__ = [
    "ADMIN_PREFIX",
    "READY_PATH",
    "TENANT_USAGE_PATHS",
    "AdminApp",
    "ReadinessCheck",
    "ledger_readiness",
]

ADMIN_PREFIX: Final = "/admin/"
READY_PATH: Final = "/readyz"
TENANT_USAGE_PATHS: Final = frozenset({"/v1/usage"})
_encode = msgspec.json.Encoder().encode


class _BadQuery(ValueError):
    pass


#: One part of ``/readyz``: whether it passes, and what the body says about it (a ``status``
#: and details, never a secret).
ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def ledger_readiness(writer: LedgerWriter) -> tuple[bool, dict[str, Any]]:
    """The ledger passes while it takes writes (``ok``) or, stuck, while the spill file can
    hold what it refuses (``spilling``: no record is lost, they are replayed later); it fails
    when stuck with nowhere to put them (``stuck``)."""
    health = writer.health()
    detail: dict[str, Any] = msgspec.to_builtins(health)
    if not health.stuck:
        detail["status"] = "ok"
        return True, detail
    spill = writer.spill
    if spill is not None and _writable(spill.path):
        detail["status"] = "spilling"
        return True, detail
    detail["status"] = "stuck"
    return False, detail


def _writable(path: str | os.PathLike[str]) -> bool:
    """Whether a file can be appended to at ``path`` (it, or its directory to create it)."""
    if os.path.exists(path):
        return os.access(path, os.W_OK)
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


class AdminApp:
    """``AdminApp(live=live, ledger=ledger, writer=writer)``: an ASGI app for the paths above."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        ledger: Ledger | None,
        writer: LedgerWriter | None = None,
        authorize: Callable[[Scope], bool] | None = None,
        health: dict[str, Callable[[], Any]] | None = None,
        checks: dict[str, ReadinessCheck] | None = None,
    ) -> None:
        self.live = live
        self.ledger = ledger
        self.writer = writer
        #: Who may read every tenant's reports (the admin API's roles); default: the admin key.
        self.authorize = authorize
        #: More parts of ``/readyz``'s body (informative: they do not make it 503).
        self.health = health or {}
        #: Parts of ``/readyz`` that decide it: each says whether it passes, and its state.
        self.checks = checks or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _error(send, 405, "Only GET is supported here.", "method_not_allowed")
            return
        if path == READY_PATH:
            await self._ready(send)
            return
        if path == "/metrics":
            settings = self.live.current.config.metering
            if settings.metrics_require_admin and not self._is_admin(scope):
                await _unauthorized(send)
                return
            content_type, body = exposition()
            await _respond(send, 200, content_type.encode(), body)
            return
        if self.ledger is None:  # metering disabled: only /metrics
            await _error(send, 404, f"Unknown request URL: GET {path}.", "unknown_url")
            return
        try:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        except UnicodeDecodeError:
            query = {}
        if path in TENANT_USAGE_PATHS:
            ctx = context_of(scope)
            if ctx is None or ctx.tenant is None:
                await _unauthorized(send)
                return
            asked = query.get("tenant")
            if asked is not None and asked != ctx.tenant.id:
                await _error(
                    send, 403, "This API key may only read its own usage.", "permission_denied"
                )
                return
            await self._usage(send, query, tenant=ctx.tenant.id)
            return
        if path == ADMIN_PREFIX + "usage":
            if not self._is_admin(scope):
                await _unauthorized(send)
                return
            await self._usage(send, query, tenant=query.get("tenant") or None)
            return
        await _error(send, 404, f"Unknown request URL: GET {path}.", "unknown_url")

    def _is_admin(self, scope: Scope) -> bool:
        if self.authorize is not None:
            return self.authorize(scope)
        snapshot = self.live.current
        expected = snapshot.config.metering.admin_key_hash
        if not expected:
            return False
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
                return bool(token) and hmac.compare_digest(
                    snapshot.hasher.hash(token).encode(), expected.encode()
                )
        return False

    async def _ready(self, send: Send) -> None:
        body: dict[str, Any] = {"status": "ready"}
        reasons: list[str] = []
        for name, check in self.checks.items():
            passed, detail = await check()
            body[name] = detail
            if not passed:
                reasons.append(f"{name}: {detail.get('status', 'failing')}")
        if self.writer is not None:  # metering enabled: the ledger must take the records
            passed, detail = ledger_readiness(self.writer)
            body["ledger"] = detail
            if not passed:
                reasons.append(f"ledger: {detail['status']}")
        body.update((name, part()) for name, part in self.health.items())
        if reasons:
            body["status"] = "not_ready"
            body["reasons"] = reasons
        await _respond(send, 503 if reasons else 200, b"application/json", _encode(body))

    async def _usage(self, send: Send, query: dict[str, str], *, tenant: str | None) -> None:
        assert self.ledger is not None
        settings = self.live.current.config.metering
        try:
            since = parse_time(query.get("since", "30d"))
            until = parse_time(query["until"]) if query.get("until") else None
            period = query.get("period", "day")
            if period not in PERIODS:
                raise _BadQuery(f"period must be one of {', '.join(PERIODS)}")
            by = query.get("by", "tenant")
            if by not in DIMENSIONS:
                raise _BadQuery(f"by must be one of {', '.join(DIMENSIONS)}")
            fmt = query.get("format", "json")
            if fmt not in ("json", "csv", "records"):
                raise _BadQuery("format must be json, csv or records")
        except ValueError as exc:
            await _error(send, 400, str(exc), "invalid_query")
            return
        if fmt == "records":
            records = await self.ledger.query(tenant=tenant, since=since, until=until)
            await _respond(send, 200, b"text/csv; charset=utf-8", records_csv(records).encode())
            return
        selected: Period = period
        grouped: Dimension = by
        rows = await usage_report(
            self.ledger,
            tenant=tenant,
            since=since,
            until=until,
            period=selected,
            by=grouped,
            currency=settings.currency,
            currency_per_usd=settings.currency_per_usd,
        )
        if fmt == "csv":
            await _respond(send, 200, b"text/csv; charset=utf-8", report_csv(rows).encode())
            return
        body = _encode({"object": "usage_report", "period": period, "data": rows})
        await _respond(send, 200, b"application/json", body)


async def _respond(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str, code: str) -> None:
    await send_error(send, status, message, type="invalid_request_error", code=code)


async def _unauthorized(send: Send) -> None:
    await _error(send, 401, "A valid admin API key is required.", "invalid_api_key")
