"""The admin API's migration routes: the comparison report and the rules, changed at once.

- ``GET /admin/migration/report?since=&until=&rule=&format=json|csv`` (admin, read-only): per
  rule and candidate, the shadow calls next to their primaries, the canary calls, rollbacks.
- ``GET /admin/migration/rules`` (admin, read-only): the ``[migration]`` settings in force.
- ``PUT /admin/migration/rules`` (admin): new ``[migration]`` settings, checked like the file's
  and in force for the next request (a share of 0 is the rollback).
- ``PATCH /admin/migration/rules/{rule}/candidates/{upstream}`` (admin): one candidate's
  ``canary_percent`` / ``shadow_percent``.
- ``DELETE /admin/migration/rules`` (admin): drop the rules changed here; the file's apply.

With a shared registry (``gateway.registry_url``) a change is kept in it and reaches every
process and replica the way a tenant's does (``RulesWriter``); it wins over the file's rules
until it is deleted. Without one, a change applies to this process's configuration: it lasts
until the file is reloaded (the file has the last word), and with several processes it is
refused (put the rules in the file and reload every process instead). Changes are logged
with the caller's key id (and audited, when shared).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from tenantware.admin.auth import Caller
from tenantware.admin.rules import RulesWriter
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.config import MigrationCandidate, MigrationSettings, Share
from tenantware.metering.reports import parse_time
from tenantware.migration import ReportRow, report_csv
from tenantware.proxy.migration import MigrationRunner
from tenantware.registry.rules import MIGRATION_RULES
from tenantware.state import LiveConfig

__all__ = ["CandidateShares", "MigrationReport", "MigrationRoutes"]

log = structlog.get_logger("tenantware.admin")
_encode = msgspec.json.Encoder().encode


class MigrationReport(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /admin/migration/report`` (JSON): one row per rule and candidate, over what every
    process sharing ``gateway.redis_url`` compared (``scope`` ``shared``), or without Redis
    over what the answering process compared (``process``; docs/migration.md)."""

    object: str = "migration_report"
    generated_at: float
    #: ``host:pid`` of the process that answered: tells replicas' reports apart.
    process: str
    #: ``shared``: the fleet's counters in Redis (periods in whole hours, percentiles within
    #: 4.9 %); ``process``: this process's own comparisons, exact.
    scope: Literal["shared", "process"] = "process"
    #: Time of the oldest comparison it still keeps (``None``: none, or a shared report): a
    #: ``since`` before it means the period is cut short by ``report_size`` or by the
    #: process's start.
    oldest_kept: float | None
    data: list[ReportRow]


class CandidateShares(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``PATCH .../candidates/{upstream}``: the shares to change (unset: kept)."""

    canary_percent: Share | None = None
    shadow_percent: Share | None = None


class MigrationRoutes:
    """Handlers for ``AdminApi``; ``allow(caller, *roles, write=...)`` and ``refusal(status,
    message, code, param)`` are the admin API's own."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        runner: MigrationRunner,
        processes: int,
        allow: Callable[..., None],
        refusal: Callable[..., Exception],
        writer: RulesWriter,
    ) -> None:
        self.live = live
        self.runner = runner
        self.processes = processes
        self.writer = writer
        self._allow = allow
        self._refusal = refusal

    def _json(self, value: Any) -> Response:
        return Response(
            _encode(value), media_type="application/json", headers={"cache-control": "no-store"}
        )

    async def report(self, request: Request, caller: Caller) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise self._method_not_allowed(request)
        self._allow(caller, "admin", "read-only")
        query = request.query_params
        fmt = query.get("format", "json")
        try:
            since = parse_time(query["since"]) if query.get("since") else 0.0
            until = parse_time(query["until"]) if query.get("until") else math.inf
            if fmt not in ("json", "csv"):
                raise ValueError("format must be json or csv")
        except ValueError as exc:
            raise self._refusal(400, str(exc), "invalid_value") from None
        try:
            rows, shared = await self.runner.report(
                since=since, until=until, rule=query.get("rule") or None
            )
        except STORE_UNAVAILABLE:
            raise self._refusal(
                503,
                "The shared report (gateway.redis_url) cannot be reached; retry shortly.",
                "report_unavailable",
            ) from None
        if fmt == "csv":
            return Response(
                report_csv(rows),
                media_type="text/csv; charset=utf-8",
                headers={"cache-control": "no-store"},
            )
        book = self.runner.book
        return self._json(
            MigrationReport(
                generated_at=time.time(),
                process=f"{socket.gethostname()}:{os.getpid()}",
                scope="shared" if shared else "process",
                oldest_kept=None if shared else min((e.ts for e in book.entries), default=None),
                data=rows,
            )
        )

    async def rules(self, request: Request, caller: Caller) -> Response:
        if request.method in ("GET", "HEAD"):
            self._allow(caller, "admin", "read-only")
            return self._json(self.live.current.config.migration)
        if request.method == "DELETE":
            self._write_allowed(caller)
            if not self.writer.shared:
                raise self._refusal(
                    409,
                    "This gateway keeps no rules of its own: reload the file to put its rules "
                    "back.",
                    "migration_rules_not_shared",
                )
            await self.writer.remove(request, caller, MIGRATION_RULES, "migration_rules.delete")
            log.info("migration rules back to the file's", actor=f"{caller.role}:{caller.id}")
            return self._json(self.live.current.config.migration)
        if request.method != "PUT":
            raise self._method_not_allowed(request)
        self._write_allowed(caller)
        try:
            settings = msgspec.json.decode(await request.body(), type=MigrationSettings)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self._refusal(400, f"Invalid body: {exc}", "invalid_value") from None
        return await self._apply(request, settings, caller)

    async def candidate(self, request: Request, caller: Caller) -> Response:
        if request.method != "PATCH":
            raise self._method_not_allowed(request)
        self._write_allowed(caller)
        name = request.path_params["rule"]
        upstream = request.path_params["upstream"]
        try:
            shares = msgspec.json.decode(await request.body(), type=CandidateShares)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self._refusal(400, f"Invalid body: {exc}", "invalid_value") from None
        current, expect = await self._current()
        rules = list(current.rules)
        for index, rule in enumerate(rules):
            if rule.name != name:
                continue
            candidates = list(rule.candidates)
            for position, found in enumerate(candidates):
                if found.upstream == upstream:
                    changes = {
                        k: v for k, v in msgspec.structs.asdict(shares).items() if v is not None
                    }
                    try:
                        candidates[position] = msgspec.convert(
                            {**msgspec.structs.asdict(found), **changes}, MigrationCandidate
                        )
                        rules[index] = msgspec.convert(
                            {
                                **msgspec.to_builtins(rule),
                                "candidates": msgspec.to_builtins(candidates),
                            },
                            type(rule),
                        )
                    except msgspec.ValidationError as exc:
                        raise self._refusal(400, f"Invalid body: {exc}", "invalid_value") from None
                    changed = msgspec.structs.replace(current, rules=rules)
                    return await self._apply(request, changed, caller, expect=expect)
        raise self._refusal(
            404, f"No candidate {upstream!r} in a rule {name!r}.", "migration_candidate_not_found"
        )

    def _method_not_allowed(self, request: Request) -> Exception:
        return self._refusal(405, f"{request.method} is not supported here.", "method_not_allowed")

    async def _current(self) -> tuple[MigrationSettings, int | None]:
        """The settings a change starts from, and the version to write over (``None``: this
        process's own configuration, not shared)."""
        if not self.writer.shared:
            return self.live.current.config.migration, None
        held = await self.writer.get(MIGRATION_RULES)
        if held is None:
            return self.live.file_config.migration, 0
        return msgspec.json.decode(held.document, type=MigrationSettings), held.version

    def _write_allowed(self, caller: Caller) -> None:
        if caller.role == "admin" and self.processes > 1 and not self.writer.shared:
            # Before the registry's own refusal, which speaks of tenants.
            raise self._refusal(
                409,
                "Migration rules changed here would reach only this process: change them in the "
                "configuration file and reload every process (or set gateway.registry_url to "
                "keep them in a shared registry).",
                "migration_rules_not_shared",
            )
        self._allow(caller, "admin", write=True)

    async def _apply(
        self,
        request: Request,
        settings: MigrationSettings,
        caller: Caller,
        *,
        expect: int | None = None,
    ) -> Response:
        # Checked over what they will apply to: the file's settings, or with a shared
        # registry the configuration in force (its tenants are the registry's, brought up to
        # date first: another replica may have just added the tenant named).
        if self.writer.shared:
            await self.writer.sync.refresh()
        base = self.live.current.config if self.writer.shared else self.live.file_config
        try:
            # ``replace`` runs the configuration's own checks (the names it refers to).
            config = msgspec.structs.replace(base, migration=settings)
        except msgspec.ValidationError as exc:
            raise self._refusal(400, f"Invalid rules: {exc}", "invalid_value") from None
        if self.writer.shared:
            await self.writer.write(
                request,
                caller,
                MIGRATION_RULES,
                _encode(settings),
                "migration_rules.update",
                expect=expect,
            )
        else:
            self.live.replace(config)
        log.info(
            "migration rules changed", actor=f"{caller.role}:{caller.id}", rules=len(settings.rules)
        )
        return self._json(self.live.current.config.migration)
