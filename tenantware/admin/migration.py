"""The admin API's migration routes: the comparison report and the rules, changed at once.

- ``GET /admin/migration/report?since=&until=&rule=&format=json|csv`` (admin, read-only): per
  rule and candidate, the shadow calls next to their primaries, the canary calls, rollbacks.
- ``GET /admin/migration/rules`` (admin, read-only): the ``[migration]`` settings in force.
- ``PUT /admin/migration/rules`` (admin): new ``[migration]`` settings, checked like the file's
  and in force for the next request (a share of 0 is the rollback).
- ``PATCH /admin/migration/rules/{rule}/candidates/{upstream}`` (admin): one candidate's
  ``canary_percent`` / ``shadow_percent``.

A change applies to this process's configuration: it lasts until the file is reloaded (the
file has the last word), and with several processes it is refused (put the rules in the file
and reload every process instead). Changes are logged with the caller's key id.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from tenantware.admin.auth import Caller
from tenantware.config import MigrationCandidate, MigrationSettings, Share
from tenantware.metering.reports import parse_time
from tenantware.migration import ReportRow, report_csv
from tenantware.proxy.migration import MigrationRunner
from tenantware.state import LiveConfig

__all__ = ["CandidateShares", "MigrationReport", "MigrationRoutes"]

log = structlog.get_logger("tenantware.admin")
_encode = msgspec.json.Encoder().encode


class MigrationReport(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /admin/migration/report`` (JSON): one row per rule and candidate, over what the
    answering process compared (each replica keeps its own; docs/migration.md)."""

    object: str = "migration_report"
    generated_at: float
    #: ``host:pid`` of the process that answered: tells replicas' reports apart.
    process: str
    #: Time of the oldest comparison it still keeps (``None``: none): a ``since`` before it
    #: means the period is cut short by ``report_size`` or by the process's start.
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
    ) -> None:
        self.live = live
        self.runner = runner
        self.processes = processes
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
        rows = self.runner.book.report(
            since=since,
            until=until,
            rule=query.get("rule") or None,
            rolled_back=self.runner.report_rolled_back(),
        )
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
                oldest_kept=min((entry.ts for entry in book.entries), default=None),
                data=rows,
            )
        )

    async def rules(self, request: Request, caller: Caller) -> Response:
        if request.method in ("GET", "HEAD"):
            self._allow(caller, "admin", "read-only")
            return self._json(self.live.current.config.migration)
        if request.method != "PUT":
            raise self._method_not_allowed(request)
        self._write_allowed(caller)
        try:
            settings = msgspec.json.decode(await request.body(), type=MigrationSettings)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self._refusal(400, f"Invalid body: {exc}", "invalid_value") from None
        return self._apply(settings, caller)

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
        current = self.live.current.config.migration
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
                    return self._apply(msgspec.structs.replace(current, rules=rules), caller)
        raise self._refusal(
            404, f"No candidate {upstream!r} in a rule {name!r}.", "migration_candidate_not_found"
        )

    def _method_not_allowed(self, request: Request) -> Exception:
        return self._refusal(405, f"{request.method} is not supported here.", "method_not_allowed")

    def _write_allowed(self, caller: Caller) -> None:
        self._allow(caller, "admin", write=True)
        if self.processes > 1:
            raise self._refusal(
                409,
                "Migration rules changed here would reach only this process: change them in the "
                "configuration file and reload every process.",
                "migration_rules_not_shared",
            )

    def _apply(self, settings: MigrationSettings, caller: Caller) -> Response:
        try:
            # ``replace`` runs the configuration's own checks (the names it refers to).
            config = msgspec.structs.replace(self.live.file_config, migration=settings)
        except msgspec.ValidationError as exc:
            raise self._refusal(400, f"Invalid rules: {exc}", "invalid_value") from None
        self.live.replace(config)
        log.info(
            "migration rules changed", actor=f"{caller.role}:{caller.id}", rules=len(settings.rules)
        )
        return self._json(self.live.current.config.migration)
