"""The admin API under ``/admin/``: tenants and their keys, changed at run time.

Every change is one registry write (version bump, audit entry and pub/sub message together);
this process applies it before answering, every other replica on the message. With a ledger,
the change's audit row (values before and after) is stored there before the answer. The routes,
their roles and bodies are in ``/admin/openapi.json``; ``/admin/usage`` (metering) and
anything unknown fall through to ``fallback``.

Refusals are OpenAI-shaped: 400 names the field (``param``), 401 without a valid key, 403
for a role that may not, 404 for another tenant's id when a tenant key asks (never 403:
it must not learn which tenants exist), 412 on an ``If-Match`` mismatch, 503 when a shared
registry cannot be reached.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Final, TypeVar

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from tenantware.admin.auth import AdminAuth, Caller
from tenantware.admin.migration import MigrationRoutes
from tenantware.admin.openapi import openapi_document
from tenantware.admin.rules import RulesWriter
from tenantware.admin.schemas import (
    AdminKeyIssue,
    AdminKeyIssued,
    AdminKeyList,
    AdminKeyOut,
    AlertHistory,
    AlertList,
    AlertRuleList,
    AuditList,
    BalanceCheckOut,
    BalanceOut,
    BalanceReconciled,
    BalanceVerify,
    CodesCreate,
    CodesCreated,
    CreditOut,
    JournalList,
    JournalOut,
    KeyIssue,
    KeyIssued,
    KeyList,
    KeyRotate,
    LogList,
    PaymentAck,
    PolicyPatch,
    Redeem,
    TenantCreate,
    TenantList,
    TenantOut,
    TenantPatch,
    TenantStorage,
    TierList,
    TierOut,
    TopUp,
    UpstreamKeyIn,
    UpstreamKeyOut,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
    WebhookOut,
    key_out,
    limits_patched,
    policy_out,
    tenant_out,
)
from tenantware.alerts.engine import AlertEngine
from tenantware.alerts.model import TenantWebhook
from tenantware.alerts.rules import rules_in_force
from tenantware.alerts.webhooks import WebhookRefused
from tenantware.audit import AuditAction, AuditEntry, public_value
from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.backends.sealed import SealError, seal_key
from tenantware.balances import (
    Balances,
    CodeUnusable,
    Credit,
    InvalidPayment,
    PaymentProvider,
    ReferenceTaken,
)
from tenantware.config import AdminKey, ApiKey, Tenant, UpstreamKey, policy_problem
from tenantware.crypto import MissingMasterKey
from tenantware.errors import error_body
from tenantware.keys import generate_key
from tenantware.metering.ledger.auditlog import AuditFilter, AuditLog
from tenantware.metering.ledger.base import LedgerUnavailable
from tenantware.metering.pricing import nanousd_to_usd, usd_to_nanousd
from tenantware.proxy.migration import MigrationRunner
from tenantware.registry.rules import ALERT_RULES
from tenantware.registry.store import RegistryStore, VersionMismatch
from tenantware.registry.sync import RegistrySync
from tenantware.state import LiveConfig
from tenantware.tenantdata import TenantData
from tenantware.types import ASGIApp, Receive, Scope, Send

__all__ = ["AdminApi"]

#: Live (not revoked, not expired) keys one tenant may hold.
MAX_KEYS: Final = 100
#: Characters of a new key shown in listings (``tw-`` and a few random ones).
KEY_PREFIX_CHARS: Final = 10
_UNKNOWN_FIELD: Final = re.compile(r"unknown field `([^`]+)`")
_NAMED_FIELD: Final = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")
_VALID_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_encode = msgspec.json.Encoder().encode
_T = TypeVar("_T")
_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: The caller of a route that needs no key (the OpenAPI document): may see nothing else.
_NOBODY: Final = Caller(role="tenant", id="anonymous", tenant=None)
log = structlog.get_logger("tenantware.admin")


class Refusal(Exception):
    """An answer other than success; becomes the OpenAI error body."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def response(self) -> Response:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        body = error_body(self.message, type=kind, code=self.code, param=self.param)
        return Response(body, self.status, media_type="application/json")


def _not_found(tenant_id: str) -> Refusal:
    return Refusal(404, f"No tenant {tenant_id!r}.", "tenant_not_found", param="tenant_id")


def _param_of(error: msgspec.ValidationError, prefix: str = "") -> str | None:
    """The field msgspec's message names (``... - at `$.limits.rpm```), dotted."""
    text = str(error)
    marker = "- at `$."
    at = text.rfind(marker)
    if at < 0:  # a mapping's key: "... - at `key` in `$.flags`"
        marker = "in `$."
        at = text.rfind(marker)
    path = prefix + text[at + len(marker) : -1] if at >= 0 else prefix.rstrip(".")
    path = path.replace("[...]", "")  # a mapping's value: msgspec does not name the key
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    named = _NAMED_FIELD.match(text)  # a check of the struct itself: "`field` must be ..."
    if not path and named is not None:
        path = named.group(1)
    return path or None


def _tenant(fields: dict[str, Any]) -> Tenant:
    """A tenant from checked fields, its own checks (amounts, ranges) answered as 400."""
    try:
        return Tenant(**fields)
    except msgspec.ValidationError as exc:
        raise Refusal(400, f"Invalid body: {exc}", "invalid_value", param=_param_of(exc)) from None


def _decode(body: bytes, kind: type[_T], *, empty_ok: bool = False) -> _T:
    if not body.strip() and empty_ok:
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise Refusal(400, f"Invalid body: {exc}", "invalid_value", param=_param_of(exc)) from None
    except msgspec.DecodeError:
        raise Refusal(400, "The body is not valid JSON.", "invalid_json") from None


def _json(value: Any, status: int = 200, *, version: int | None = None) -> Response:
    headers = {"cache-control": "no-store"}
    if version is not None:
        headers["etag"] = f'"{version}"'
    return Response(_encode(value), status, media_type="application/json", headers=headers)


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not (value.isascii() and value.isdigit()):
        raise Refusal(
            400, "If-Match must be a version number (the ETag).", "invalid_value", param="If-Match"
        )
    return int(value)


class AdminApi:
    """``AdminApi(live=live, store=store, sync=sync, fallback=usage_app)``: an ASGI app."""

    def __init__(
        self,
        *,
        live: LiveConfig,
        store: RegistryStore,
        sync: RegistrySync,
        fallback: ASGIApp,
        processes: int = 1,
        audit_log: AuditLog | None = None,
        tenant_data: TenantData | None = None,
        balances: Balances | None = None,
        payments: dict[str, PaymentProvider] | None = None,
        alerts: AlertEngine | None = None,
        migration: MigrationRunner | None = None,
    ) -> None:
        self.live = live
        #: The tenants' kept data (logs, cache, key material): read through the API and
        #: destroyed with the tenant.
        self.tenant_data = tenant_data
        #: The alert engine (``None`` while no alert destination is configured).
        self.alerts = alerts
        self.store = store
        self.sync = sync
        #: The durable trail (the ledger); without it the registry's own short trail is read.
        self.audit_log = audit_log
        #: A change to a registry other processes do not share would reach only this one.
        self._writes_refused = not store.shared and processes > 1
        self._processes = processes
        #: Prepaid balances (a ledger with a balance journal is needed), payment webhooks.
        self.balances = balances
        self.payments = payments or {}
        self.auth = AdminAuth(live)
        #: Rules changed at run time: into the shared registry, when there is one.
        self.rules_writer = RulesWriter(store, sync, audit_log=audit_log, refusal=Refusal)
        on = self._endpoint
        # Each endpoint takes every method and answers an unsupported one itself (405 in the
        # OpenAI shape, which Starlette's own 405 is not).
        routes = {
            "/admin/openapi.json": on(self._openapi, auth=False),
            "/admin/tenants": on(self._tenants),
            "/admin/tenants/{tenant_id}": on(self._tenant),
            "/admin/tenants/{tenant_id}/keys": on(self._keys),
            "/admin/tenants/{tenant_id}/logs": on(self._logs),
            "/admin/tenants/{tenant_id}/storage": on(self._storage),
            "/admin/tenants/{tenant_id}/keys/{key_id}/{action}": on(self._key),
            "/admin/tiers": on(self._list_tiers),
            "/admin/keys": on(self._admin_keys),
            "/admin/keys/{key_id}/revoke": on(self._revoke_admin_key),
            "/admin/audit": on(self._audit),
            "/admin/tenants/{tenant_id}/policy": on(self._policy),
            "/admin/tenants/{tenant_id}/upstream-keys/{upstream}": on(self._upstream_key),
            "/admin/tenants/{tenant_id}/balance": on(self._balance),
            "/admin/tenants/{tenant_id}/balance/topups": on(self._topup),
            "/admin/tenants/{tenant_id}/balance/journal": on(self._journal),
            "/admin/tenants/{tenant_id}/balance/redeem": on(self._redeem),
            "/admin/tenants/{tenant_id}/balance/reconcile": on(self._reconcile),
            "/admin/redemption-codes": on(self._create_codes),
            "/admin/balances/verify": on(self._verify),
            "/admin/payments/{provider}": on(self._payment, auth=False),
            "/admin/alerts": on(self._alert_history),
            "/admin/alerts/active": on(self._active_alerts),
            "/admin/alerts/rules": on(self._alert_rules),
            "/admin/tenants/{tenant_id}/webhooks": on(self._webhooks),
            "/admin/tenants/{tenant_id}/webhooks/{webhook_id}": on(self._webhook),
        }
        if migration is not None:
            trials = MigrationRoutes(
                live=live,
                runner=migration,
                processes=processes,
                allow=self._allow,
                refusal=Refusal,
                writer=self.rules_writer,
            )
            routes["/admin/migration/report"] = on(trials.report)
            routes["/admin/migration/rules"] = on(trials.rules)
            routes["/admin/migration/rules/{rule}/candidates/{upstream}"] = on(trials.candidate)
        self.router = Router(
            [Route(path, endpoint, methods=_METHODS) for path, endpoint in routes.items()],
            default=fallback,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    def may_read_reports(self, scope: Scope) -> bool:
        """For ``/admin/usage`` and ``/metrics``: an admin or read-only key."""
        caller = self.auth.identify(scope)
        return caller is not None and caller.role != "tenant"

    # -- plumbing ------------------------------------------------------------------------

    def _endpoint(
        self,
        handler: Callable[[Request, Caller], Awaitable[Response]],
        *,
        auth: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            incoming = request.headers.get("x-request-id", "")
            request_id = (
                incoming
                if _VALID_REQUEST_ID.fullmatch(incoming)
                else f"req_{secrets.token_hex(12)}"
            )
            request.state.request_id = request_id
            try:
                caller = self.auth.identify(request.scope)
                if auth and caller is None:
                    raise Refusal(
                        401, "A valid admin or tenant API key is required.", "invalid_api_key"
                    )
                response = await handler(request, caller or _NOBODY)
            except Refusal as refusal:
                response = refusal.response()
            except LedgerUnavailable:
                response = Refusal(
                    503, "The ledger cannot be reached; retry shortly.", "ledger_unavailable"
                ).response()
                response.headers["retry-after"] = "1"
            except STORE_UNAVAILABLE:
                response = Refusal(
                    503,
                    "The tenant registry cannot be reached; retry shortly. Requests are "
                    "still served from the last copy.",
                    "registry_unavailable",
                ).response()
                response.headers["retry-after"] = "1"
            except Exception:
                # A bug: logged with its traceback, answered as the OpenAI-shaped 500 the
                # rest of the gateway gives (this app is outermost on its routes).
                log.exception("admin API request failed", request_id=request_id)
                response = Refusal(
                    500, "The gateway failed to process your request.", "internal_error"
                ).response()
            response.headers["x-request-id"] = request_id
            return response

        return endpoint

    def _allow(
        self, caller: Caller, *roles: str, tenant_id: str | None = None, write: bool = False
    ) -> None:
        """Refuse unless ``caller`` may; a tenant key naming another tenant gets 404."""
        if caller.role == "tenant" and tenant_id is not None and tenant_id != caller.tenant:
            raise _not_found(tenant_id)
        if caller.role not in roles:
            what = "change" if write else "read"
            raise Refusal(
                403, f"This key may not {what} this resource ({caller.role}).", "permission_denied"
            )
        if write and self._writes_refused:
            raise Refusal(
                409,
                f"This gateway runs {self._processes} processes on the configuration file's "
                "tenants: a change here would reach only one of them. Set "
                "gateway.registry_url (Redis) to change tenants at run time, or edit the file.",
                "registry_not_shared",
            )

    def _audit_entry(
        self,
        request: Request,
        caller: Caller,
        action: AuditAction,
        tenant_id: str,
        before: int,
        key_id: str | None = None,
    ) -> AuditEntry:
        client = request.client
        return AuditEntry(
            at=time.time(),
            actor=f"{caller.role}:{caller.id}",
            role=caller.role,
            action=action,
            tenant=tenant_id,
            before_version=before,
            key_id=key_id,
            request_id=request.state.request_id,
            address=client.host if client else None,
        )

    async def _record(
        self,
        audit: AuditEntry,
        version: int,
        before: msgspec.Struct | None,
        after: msgspec.Struct | None,
    ) -> None:
        """Store the entry of a change that succeeded in the ledger, before it is answered.

        The change itself already stands: if the ledger cannot take the entry, it is logged
        whole at error level (it holds no secret) and stays in the registry's own trail."""
        if self.audit_log is None:
            return
        entry = msgspec.structs.replace(
            audit,
            id=f"aud_{secrets.token_hex(12)}",
            version=version,
            before=public_value(before),
            after=public_value(after),
        )
        try:
            await self.audit_log.write_audit(entry)
        except Exception:
            log.exception("audit entry not stored in the ledger", **msgspec.to_builtins(entry))

    def _out(self, tenant: Tenant, version: int) -> TenantOut:
        return tenant_out(tenant, version, self.live.file_config.all_tiers())

    def _check_tenant(self, tenant: Tenant) -> None:
        """The checks the file's loader makes, naming the field (the registry must never hold
        a tenant the gateway could not load)."""
        config = self.live.file_config
        tiers = config.all_tiers()
        if tenant.tier not in tiers:
            known = ", ".join(sorted(tiers))
            raise Refusal(
                400,
                f"Unknown tier {tenant.tier!r} (known: {known}).",
                "invalid_value",
                param="tier",
            )
        catalogue = config.catalogue()
        for param, models in (
            ("allowed_models", tenant.allowed_models),
            ("data.cache_models", tenant.data.cache_models),
        ):
            for model in models:
                if (
                    model != "*"
                    and model not in catalogue
                    and config.aliases.get(model) not in catalogue
                ):
                    raise Refusal(
                        400,
                        f"Unknown model {model!r} (known: {', '.join(sorted(catalogue))}).",
                        "invalid_value",
                        param=param,
                    )
        problem = policy_problem(tenant.policy, config, catalogue)
        if problem is not None:
            field, message = problem
            raise Refusal(400, f"Invalid {field}: {message}.", "invalid_value", param=field)

    async def _modify(
        self,
        request: Request,
        caller: Caller,
        tenant_id: str,
        action: AuditAction,
        change: Callable[[Tenant], Tenant],
        *,
        key_id: str | None = None,
    ) -> tuple[int, Tenant]:
        """Read, change and write one tenant; with ``If-Match`` the read must be that version,
        without it a concurrent change is retried on the new version."""
        wanted = _if_match(request)
        for _ in range(8):
            record = await self.store.get(tenant_id)
            if record is None:
                raise _not_found(tenant_id)
            if wanted is not None and wanted != record.version:
                raise _precondition(record.version)
            updated = change(record.tenant)
            self._check_tenant(updated)
            audit = self._audit_entry(request, caller, action, tenant_id, record.version, key_id)
            try:
                version = await self.store.put(updated, expect=record.version, audit=audit)
            except VersionMismatch as exc:
                if wanted is not None:
                    raise _precondition(exc.current) from None
                continue
            await self.sync.refresh()
            await self._record(audit, version, record.tenant, updated)
            return version, updated
        raise Refusal(409, "The tenant keeps changing; retry.", "conflict")

    # -- routes ----------------------------------------------------------------------------

    async def _openapi(self, request: Request, caller: Caller) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        return Response(openapi_document(), media_type="application/json")

    async def _tenants(self, request: Request, caller: Caller) -> Response:
        if request.method == "GET":
            self._allow(caller, "admin", "read-only", "tenant")
            return await self._list(request, caller)
        if request.method == "POST":
            self._allow(caller, "admin", write=True)
            return await self._create(request, caller)
        raise _method(request)

    async def _list(self, request: Request, caller: Caller) -> Response:
        query = request.query_params
        limit = _int_param(query.get("limit"), "limit", default=100, low=1, high=1000)
        after = query.get("after")
        state = await self.store.load()
        ids = sorted(state.records)
        if caller.role == "tenant":
            ids = [i for i in ids if i == caller.tenant]
        if after:
            ids = [i for i in ids if i > after]
        page = ids[:limit]
        tiers = self.live.file_config.all_tiers()
        data = [tenant_out(state.records[i].tenant, state.records[i].version, tiers) for i in page]
        return _json(
            TenantList(
                data=data,
                first_id=page[0] if page else None,
                last_id=page[-1] if page else None,
                has_more=len(ids) > limit,
            )
        )

    async def _create(self, request: Request, caller: Caller) -> Response:
        body = await request.body()
        wanted = _decode(body, TenantCreate)
        tenant = _tenant(msgspec.structs.asdict(wanted))
        self._check_tenant(tenant)
        replayed = False
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise Refusal(
                    400,
                    "Idempotency-Key must be 1 to 255 characters.",
                    "invalid_value",
                    param="Idempotency-Key",
                )
            fingerprint = hashlib.sha256(body).hexdigest().encode()
            name = "tenants:" + hashlib.sha256(idempotency_key.encode()).hexdigest()
            ttl = self.live.current.config.gateway.idempotency_ttl_s
            kept = await self.store.remember(name, fingerprint, ttl)
            if kept is not None and kept != fingerprint:
                raise Refusal(
                    422,
                    "This Idempotency-Key was used with another body.",
                    "idempotency_key_reused",
                    param="Idempotency-Key",
                )
            replayed = kept is not None
        if replayed:
            record = await self.store.get(tenant.id)
            if record is not None:
                response = _json(
                    self._out(record.tenant, record.version),
                    201,
                    version=record.version,
                )
                response.headers["idempotent-replayed"] = "true"
                return response
        audit = self._audit_entry(request, caller, "tenant.create", tenant.id, 0)
        try:
            version = await self.store.put(tenant, expect=0, audit=audit)
        except VersionMismatch:
            raise Refusal(
                409, f"Tenant {tenant.id!r} already exists.", "tenant_exists", param="id"
            ) from None
        await self.sync.refresh()
        await self._record(audit, version, None, tenant)
        return _json(self._out(tenant, version), 201, version=version)

    async def _tenant(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        method = request.method
        if method in ("GET", "HEAD"):
            self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
            record = await self.store.get(tenant_id)
            if record is None:
                raise _not_found(tenant_id)
            return _json(self._out(record.tenant, record.version), version=record.version)
        if method == "PATCH":
            self._allow(caller, "admin", tenant_id=tenant_id, write=True)
            patch = _decode(await request.body(), TenantPatch)
            version, tenant = await self._modify(
                request, caller, tenant_id, "tenant.update", lambda t: _patched(t, patch)
            )
            return _json(self._out(tenant, version), version=version)
        if method == "DELETE":
            self._allow(caller, "admin", tenant_id=tenant_id, write=True)
            wanted = _if_match(request)
            record = await self.store.get(tenant_id)
            if record is None:
                if self.tenant_data is not None:
                    # A deletion whose shredding failed is finished by repeating it.
                    await self.tenant_data.forget(tenant_id)
                raise _not_found(tenant_id)
            expect = record.version if wanted is None else wanted
            audit = self._audit_entry(request, caller, "tenant.delete", tenant_id, record.version)
            try:
                version = await self.store.delete(tenant_id, expect=expect, audit=audit)
            except VersionMismatch as exc:
                if exc.current == 0:
                    raise _not_found(tenant_id) from None
                raise _precondition(exc.current) from None
            await self.sync.refresh()
            await self._record(audit, version, record.tenant, None)
            if self.tenant_data is not None:
                # Crypto-shredding: the tenant's key material first, then its rows.
                await self.tenant_data.forget(tenant_id)
            return _json({"object": "tenant.deleted", "id": tenant_id, "deleted": True})
        raise _method(request)

    async def _keys(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method in ("GET", "HEAD"):
            self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
            record = await self.store.get(tenant_id)
            if record is None:
                raise _not_found(tenant_id)
            keys = [key_out(tenant_id, key) for key in record.tenant.keys]
            return _json(KeyList(data=keys), version=record.version)
        if request.method == "POST":
            self._allow(caller, "admin", tenant_id=tenant_id, write=True)
            wanted = _decode(await request.body(), KeyIssue, empty_ok=True)
            key_id = wanted.id or f"key_{secrets.token_hex(6)}"
            plain = generate_key("tw")
            now = time.time()
            new = ApiKey(
                id=key_id,
                hash=self.live.current.hasher.hash(plain),
                prefix=plain[:KEY_PREFIX_CHARS],
                expires_at=wanted.expires_at,
                created_at=now,
            )

            def issue(tenant: Tenant) -> Tenant:
                return _with_key(tenant, new, now)

            version, _ = await self._modify(
                request, caller, tenant_id, "key.issue", issue, key_id=key_id
            )
            issued = KeyIssued(
                id=key_id,
                tenant=tenant_id,
                prefix=new.prefix,
                key=plain,
                expires_at=new.expires_at,
                created_at=now,
            )
            return _json(issued, 201, version=version)
        raise _method(request)

    async def _key(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        key_id: str = request.path_params["key_id"]
        action: str = request.path_params["action"]
        if action not in ("rotate", "revoke"):
            raise Refusal(
                404, f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
            )
        if request.method != "POST":
            raise _method(request)
        now = time.time()
        if action == "revoke":
            self._allow(caller, "admin", tenant_id=tenant_id, write=True)

            def revoke(tenant: Tenant) -> Tenant:
                old = _find_key(tenant, key_id)
                changed = msgspec.structs.replace(old, revoked=True)
                return _replace_key(tenant, changed, now)

            version, tenant = await self._modify(
                request, caller, tenant_id, "key.revoke", revoke, key_id=key_id
            )
            return _json(key_out(tenant_id, _find_key(tenant, key_id)), version=version)
        self._allow(caller, "admin", "tenant", tenant_id=tenant_id, write=True)
        wanted = _decode(await request.body(), KeyRotate, empty_ok=True)
        plain = generate_key("tw")
        new = ApiKey(
            id=f"key_{secrets.token_hex(6)}",
            hash=self.live.current.hasher.hash(plain),
            prefix=plain[:KEY_PREFIX_CHARS],
            created_at=now,
        )

        def rotate(tenant: Tenant) -> Tenant:
            old = _find_key(tenant, key_id)
            if old.revoked:
                raise Refusal(409, f"Key {key_id!r} is revoked.", "key_revoked", param="key_id")
            if wanted.grace_s == 0:
                ended = msgspec.structs.replace(old, revoked=True)
            else:
                until = now + wanted.grace_s
                if old.expires_at is not None:
                    until = min(until, old.expires_at)
                ended = msgspec.structs.replace(old, expires_at=until)
            return _with_key(_replace_key(tenant, ended, now), new, now)

        version, tenant = await self._modify(
            request, caller, tenant_id, "key.rotate", rotate, key_id=key_id
        )
        issued = KeyIssued(
            id=new.id,
            tenant=tenant_id,
            prefix=new.prefix,
            key=plain,
            expires_at=None,
            created_at=now,
            rotated=key_out(tenant_id, _find_key(tenant, key_id)),
        )
        return _json(issued, 201, version=version)

    async def _admin_keys(self, request: Request, caller: Caller) -> Response:
        if request.method in ("GET", "HEAD"):
            self._allow(caller, "admin")
            state = await self.store.load()
            issued = set(state.admins)
            data = [
                AdminKeyOut(
                    id=key.id,
                    role=key.role,
                    prefix=key.prefix,
                    created_at=key.created_at,
                    source="api" if key.id in issued else "config",
                )
                for key in self.live.current.config.gateway.admin_keys
            ]
            for key_id in sorted(issued - {d.id for d in data}):
                key = state.admins[key_id]
                data.append(
                    AdminKeyOut(
                        id=key.id,
                        role=key.role,
                        prefix=key.prefix,
                        created_at=key.created_at,
                        source="api",
                    )
                )
            return _json(AdminKeyList(data=data))
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin", write=True)
        wanted = _decode(await request.body(), AdminKeyIssue, empty_ok=True)
        key_id = wanted.id or f"admin_{secrets.token_hex(6)}"
        if any(k.id == key_id for k in self.live.file_config.gateway.admin_keys):
            raise Refusal(409, f"Admin key id {key_id!r} is taken.", "key_exists", param="id")
        plain = generate_key("twa")
        now = time.time()
        key = AdminKey(
            id=key_id,
            hash=self.live.current.hasher.hash(plain),
            role=wanted.role,
            prefix=plain[:KEY_PREFIX_CHARS],
            created_at=now,
        )
        audit = self._audit_entry(request, caller, "admin_key.issue", "", 0, key_id)
        try:
            version = await self.store.put_admin(key, expect=0, audit=audit)
        except VersionMismatch:
            raise Refusal(
                409, f"Admin key id {key_id!r} is taken.", "key_exists", param="id"
            ) from None
        await self.sync.refresh()
        await self._record(audit, version, None, key)
        answer = AdminKeyIssued(
            id=key_id, role=key.role, prefix=key.prefix, key=plain, created_at=now
        )
        return _json(answer, 201, version=version)

    async def _revoke_admin_key(self, request: Request, caller: Caller) -> Response:
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin", write=True)
        key_id: str = request.path_params["key_id"]
        audit = self._audit_entry(request, caller, "admin_key.revoke", "", 0, key_id)
        previous = (await self.store.load()).admins.get(key_id)
        try:
            version = await self.store.delete_admin(key_id, expect=None, audit=audit)
        except VersionMismatch:
            raise Refusal(
                404,
                f"No admin key {key_id!r} issued through the API (keys of the configuration "
                "file or the environment are removed there).",
                "key_not_found",
                param="key_id",
            ) from None
        await self.sync.refresh()
        await self._record(audit, version, previous, None)
        return _json(
            {"object": "admin_key.revoked", "id": key_id, "revoked": True}, version=version
        )

    async def _list_tiers(self, request: Request, caller: Caller) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only")
        tiers = self.live.current.config.all_tiers()
        data = [
            TierOut(
                id=name,
                weight=tier.weight,
                max_priority=tier.max_priority,
                limits=tier.limits,
                max_queue_wait_s=tier.max_queue_wait_s,
            )
            for name, tier in sorted(tiers.items())
        ]
        return _json(TierList(data=data))

    async def _logs(self, request: Request, caller: Caller) -> Response:
        """A tenant's request logs, decrypted: for admins and for the tenant itself."""
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        tenant_id: str = request.path_params["tenant_id"]
        self._allow(caller, "admin", "tenant", tenant_id=tenant_id)
        if self.live.current.registry.by_id(tenant_id) is None:
            raise _not_found(tenant_id)
        query = request.query_params
        limit = _int_param(query.get("limit"), "limit", default=100, low=1, high=1000)
        since = _float_param(query.get("since"), "since")
        until = _float_param(query.get("until"), "until")
        try:
            logs = (
                await self.tenant_data.read_logs(
                    tenant_id, since=since or 0.0, until=until, limit=limit
                )
                if self.tenant_data is not None
                else []
            )
        except MissingMasterKey:
            raise Refusal(
                503,
                "Request logs cannot be opened: the gateway has no master key (data.master_key_env"
                " or data.master_key_file).",
                "master_key_missing",
            ) from None
        return _json(LogList(data=logs))

    async def _storage(self, request: Request, caller: Caller) -> Response:
        """Bytes a tenant's cached answers and logs take, and its quotas."""
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        tenant_id: str = request.path_params["tenant_id"]
        self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
        tenant = self.live.current.registry.by_id(tenant_id)
        if tenant is None:
            raise _not_found(tenant_id)
        used = (
            await self.tenant_data.storage(tenant_id)
            if self.tenant_data is not None
            else {"cache_bytes": 0, "log_bytes": 0}
        )
        return _json(
            TenantStorage(
                id=tenant_id,
                cache_bytes=used["cache_bytes"],
                log_bytes=used["log_bytes"],
                cache_quota_bytes=tenant.data.cache_quota_bytes,
                log_quota_bytes=tenant.data.log_quota_bytes,
            )
        )

    async def _audit(self, request: Request, caller: Caller) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only")
        query = request.query_params
        limit = _int_param(query.get("limit"), "limit", default=100, low=1, high=1000)
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise Refusal(400, "format must be json or csv.", "invalid_value", param="format")
        wanted = AuditFilter(
            action=query.get("action") or None,
            tenant=query.get("tenant") or None,
            actor=query.get("actor") or None,
            since=_float_param(query.get("since"), "since"),
            until=_float_param(query.get("until"), "until"),
            limit=limit,
        )
        if self.audit_log is not None:
            try:
                entries = await self.audit_log.query_audit(wanted)
            except LedgerUnavailable:
                raise Refusal(
                    503, "The ledger cannot be read now; retry shortly.", "ledger_unavailable"
                ) from None
        else:
            trail = await self.store.audit(tenant=wanted.tenant, limit=limit)
            entries = [e for e in trail if wanted.matches(e)]
        if fmt == "csv":
            return Response(
                _audit_csv(entries),
                media_type="text/csv; charset=utf-8",
                headers={"cache-control": "no-store"},
            )
        return _json(AuditList(data=entries))

    # -- per-tenant policy -----------------------------------------------------------------

    def _allow_policy(self, caller: Caller, tenant: Tenant) -> None:
        """An admin, or the tenant itself where the admin allowed self-service."""
        if caller.role == "tenant" and caller.tenant == tenant.id and tenant.policy.self_service:
            return
        if caller.role == "tenant" and caller.tenant == tenant.id:
            raise Refusal(
                403,
                "This tenant's policy is changed by the gateway's admin (self-service is off).",
                "permission_denied",
            )
        self._allow(caller, "admin", tenant_id=tenant.id, write=True)

    async def _policy(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        tiers = self.live.file_config.all_tiers()
        if request.method in ("GET", "HEAD"):
            self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
            record = await self.store.get(tenant_id)
            if record is None:
                raise _not_found(tenant_id)
            return _json(policy_out(record.tenant, record.version, tiers), version=record.version)
        if request.method != "PATCH":
            raise _method(request)
        self._allow(caller, "admin", "tenant", tenant_id=tenant_id)
        patch = _decode(await request.body(), PolicyPatch)
        if caller.role == "tenant":
            for field in ("allowed_upstreams", "self_service"):
                if getattr(patch, field) is not msgspec.UNSET:
                    raise Refusal(
                        403, f"Only the admin sets {field}.", "permission_denied", param=field
                    )
        changes = {
            name: getattr(patch, name)
            for name in patch.__struct_fields__
            if getattr(patch, name) is not msgspec.UNSET
        }

        def change(tenant: Tenant) -> Tenant:
            self._allow_policy(caller, tenant)
            policy = msgspec.structs.replace(tenant.policy, **changes)
            return msgspec.structs.replace(tenant, policy=policy)

        version, tenant = await self._modify(request, caller, tenant_id, "policy.update", change)
        return _json(policy_out(tenant, version, tiers), version=version)

    async def _upstream_key(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        upstream: str = request.path_params["upstream"]
        if request.method not in ("PUT", "DELETE"):
            raise _method(request)
        self._allow(caller, "admin", "tenant", tenant_id=tenant_id)
        if all(u.name != upstream for u in self.live.file_config.upstreams):
            known = ", ".join(sorted(u.name for u in self.live.file_config.upstreams))
            raise Refusal(
                404,
                f"No upstream {upstream!r} (known: {known}).",
                "invalid_value",
                param="upstream",
            )
        now = time.time()
        if request.method == "DELETE":

            def remove(tenant: Tenant) -> Tenant:
                self._allow_policy(caller, tenant)
                keys = [k for k in tenant.policy.upstream_keys if k.upstream != upstream]
                if len(keys) == len(tenant.policy.upstream_keys):
                    raise Refusal(
                        404, f"No own key for {upstream!r}.", "key_not_found", param="upstream"
                    )
                policy = msgspec.structs.replace(tenant.policy, upstream_keys=keys)
                return msgspec.structs.replace(tenant, policy=policy)

            await self._modify(request, caller, tenant_id, "policy.update", remove)
            return _json({"object": "upstream_key.deleted", "upstream": upstream, "deleted": True})
        wanted = _decode(await request.body(), UpstreamKeyIn)
        env = self.live.current.config.gateway.secrets_key_env
        try:
            sealed = seal_key(wanted.key, tenant_id, upstream, env=env)
        except SealError as exc:
            raise Refusal(
                409, f"Own upstream keys cannot be stored here: {exc}.", "secrets_key_missing"
            ) from None
        entry = UpstreamKey(upstream=upstream, sealed=sealed, hint=wanted.key[-4:], created_at=now)

        def put(tenant: Tenant) -> Tenant:
            self._allow_policy(caller, tenant)
            keys = [k for k in tenant.policy.upstream_keys if k.upstream != upstream]
            policy = msgspec.structs.replace(tenant.policy, upstream_keys=[*keys, entry])
            return msgspec.structs.replace(tenant, policy=policy)

        version, _ = await self._modify(request, caller, tenant_id, "policy.update", put)
        answer = UpstreamKeyOut(upstream=upstream, hint=entry.hint, created_at=now)
        return _json(answer, 201, version=version)

    # -- prepaid balances ------------------------------------------------------------------

    def _balances(self, *, write: bool = False) -> Balances:
        balances = self.balances
        if balances is None:
            raise Refusal(
                404,
                "Prepaid balances need a ledger that keeps the balance journal "
                "(metering.ledger_url: sqlite or postgresql).",
                "balances_unavailable",
            )
        if write and not balances.store.remote and self._processes > 1:
            raise Refusal(
                409,
                f"This gateway runs {self._processes} processes with in-memory quota state: a "
                "credit would reach one of them. Set gateway.redis_url.",
                "balances_not_shared",
            )
        return balances

    async def _prepaid_tenant(self, tenant_id: str) -> Tenant:
        record = await self.store.get(tenant_id)
        if record is None:
            raise _not_found(tenant_id)
        return record.tenant

    async def _audit_credit(self, request: Request, caller: Caller, credit: Credit) -> None:
        if not credit.replayed:
            audit = self._audit_entry(request, caller, "balance.credit", credit.entry.tenant_id, 0)
            await self._record(audit, 0, None, credit.entry)

    async def _balance(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
        balances = self._balances()
        tenant = await self._prepaid_tenant(tenant_id)
        value = await balances.balance(tenant_id)
        low = tenant.low_balance_usd
        metering = self.live.current.config.metering
        usd = None if value is None else nanousd_to_usd(value)
        return _json(
            BalanceOut(
                tenant=tenant_id,
                billing=tenant.billing,
                balance_nanousd=value,
                balance_usd=usd,
                low_balance_usd=low,
                low=low is not None and (value or 0) < usd_to_nanousd(low),
                currency=metering.currency,
                balance_in_currency=None
                if usd is None
                else (usd * metering.currency_per_usd).quantize(Decimal("0.000001")),
            )
        )

    async def _topup(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin", tenant_id=tenant_id)
        balances = self._balances(write=True)
        key = request.headers.get("idempotency-key")
        if key is None or not 1 <= len(key) <= 255:
            raise Refusal(
                400,
                "A top-up needs an Idempotency-Key header of 1 to 255 characters (retry with "
                "the same key: it is credited once).",
                "invalid_value",
                param="Idempotency-Key",
            )
        body = await request.body()
        wanted = _decode(body, TopUp)
        tenant = await self._prepaid_tenant(tenant_id)
        try:
            credit = await balances.topup(
                tenant_id,
                usd_to_nanousd(wanted.amount_usd),
                idempotency_key=key,
                body=body,
                actor=f"{caller.role}:{caller.id}",
                note=wanted.note,
                low_nanousd=_low(tenant),
            )
        except STORE_UNAVAILABLE:
            raise _balance_store_down() from None
        except ReferenceTaken:
            raise Refusal(
                409,
                "This Idempotency-Key was used with another body.",
                "idempotency_key_reused",
                param="Idempotency-Key",
            ) from None
        await self._audit_credit(request, caller, credit)
        response = _json(_credit_out(credit), 201)
        if credit.replayed:
            response.headers["idempotent-replayed"] = "true"
        return response

    async def _journal(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only", "tenant", tenant_id=tenant_id)
        balances = self._balances()
        await self._prepaid_tenant(tenant_id)
        limit = _int_param(
            request.query_params.get("limit"), "limit", default=100, low=1, high=1000
        )
        entries = await balances.journal.entries(tenant_id, limit=limit)
        data = [
            JournalOut(
                id=e.id,
                tenant=e.tenant_id,
                at=e.at,
                kind=e.kind,
                amount_nanousd=e.amount_nanousd,
                actor=e.actor,
                note=e.note,
            )
            for e in entries
        ]
        return _json(JournalList(data=data))

    async def _redeem(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin", "tenant", tenant_id=tenant_id)
        balances = self._balances(write=True)
        wanted = _decode(await request.body(), Redeem)
        tenant = await self._prepaid_tenant(tenant_id)
        try:
            credit = await balances.redeem(
                tenant_id,
                wanted.code,
                actor=f"{caller.role}:{caller.id}",
                low_nanousd=_low(tenant),
            )
        except STORE_UNAVAILABLE:
            raise _balance_store_down() from None
        except CodeUnusable as exc:
            raise Refusal(409, str(exc), "code_unusable", param="code") from None
        await self._audit_credit(request, caller, credit)
        response = _json(_credit_out(credit), 201)
        if credit.replayed:
            response.headers["idempotent-replayed"] = "true"
        return response

    async def _create_codes(self, request: Request, caller: Caller) -> Response:
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin")
        balances = self._balances()
        wanted = _decode(await request.body(), CodesCreate)
        if wanted.tenant_id is not None:
            await self._prepaid_tenant(wanted.tenant_id)
        batch, codes = await balances.create_codes(
            wanted.count,
            usd_to_nanousd(wanted.amount_usd),
            actor=f"{caller.role}:{caller.id}",
            tenant_id=wanted.tenant_id,
            expires_at=wanted.expires_at,
        )
        created = CodesCreated(
            batch_id=batch,
            amount_usd=wanted.amount_usd,
            tenant_id=wanted.tenant_id,
            expires_at=wanted.expires_at,
            codes=codes,
        )
        audit = self._audit_entry(
            request, caller, "redemption_codes.create", wanted.tenant_id or "", 0
        )
        await self._record(audit, 0, None, msgspec.structs.replace(created, codes=[]))
        return _json(created, 201)

    async def _verify(self, request: Request, caller: Caller) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only")
        balances = self._balances()
        prepaid = [t.id for t in self.live.current.registry.tenants() if t.prepaid]
        checks = await balances.verify(prepaid)
        data = [
            BalanceCheckOut(
                tenant=c.tenant_id,
                journal_nanousd=c.journal_nanousd,
                store_nanousd=c.store_nanousd,
                ok=c.ok,
            )
            for c in checks
        ]
        return _json(BalanceVerify(ok=all(c.ok for c in data), data=data))

    async def _reconcile(self, request: Request, caller: Caller) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        if request.method != "POST":
            raise _method(request)
        self._allow(caller, "admin")
        balances = self._balances(write=True)
        tenant = await self._prepaid_tenant(tenant_id)
        try:
            done = await balances.reconcile(tenant_id, low_nanousd=_low(tenant))
        except STORE_UNAVAILABLE:
            raise Refusal(
                503,
                "The balance store cannot be reached; retry: the repair applies once.",
                "balance_store_unavailable",
            ) from None
        answer = BalanceReconciled(
            tenant=tenant_id,
            journal_nanousd=done.journal_nanousd,
            before_nanousd=done.before_nanousd,
            after_nanousd=done.after_nanousd,
            correction_nanousd=done.correction_nanousd,
            ok=(done.after_nanousd or 0) == done.journal_nanousd,
        )
        if done.correction_nanousd:
            audit = self._audit_entry(request, caller, "balance.reconcile", tenant_id, 0)
            await self._record(audit, 0, None, answer)
        return _json(answer)

    async def _payment(self, request: Request, caller: Caller) -> Response:
        name: str = request.path_params["provider"]
        if request.method != "POST":
            raise _method(request)
        provider = self.payments.get(name)
        if provider is None:
            raise Refusal(404, f"No payment provider {name!r}.", "unknown_provider")
        balances = self._balances(write=True)
        body = await request.body()
        try:
            event = provider.verify(request.headers, body)
        except InvalidPayment as exc:
            raise Refusal(400, f"Invalid payment event: {exc}", "invalid_event") from None
        if event is None:
            return _json(PaymentAck(provider=name, credited=False))
        record = await self.store.get(event.tenant_id)
        if record is None:
            raise Refusal(
                422, f"The event names no known tenant ({event.tenant_id!r}).", "unknown_tenant"
            )
        try:
            credit = await balances.pay(event, low_nanousd=_low(record.tenant))
        except STORE_UNAVAILABLE:
            raise _balance_store_down() from None
        except ReferenceTaken:
            raise Refusal(
                409, "This event id was delivered before with other values.", "event_reused"
            ) from None
        payer = Caller(role="tenant", id=f"provider:{name}", tenant=event.tenant_id)
        await self._audit_credit(request, payer, credit)
        return _json(PaymentAck(provider=name, credited=True, credit=_credit_out(credit)))

    def _alert_tenant(self, request: Request, caller: Caller) -> str | None:
        """The tenant whose alerts ``caller`` may read: a tenant key only its own."""
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only", "tenant")
        wanted = request.query_params.get("tenant") or None
        if caller.role == "tenant":
            if wanted is not None and wanted != caller.tenant:
                raise _not_found(wanted)
            return caller.tenant
        return wanted

    async def _alert_history(self, request: Request, caller: Caller) -> Response:
        tenant = self._alert_tenant(request, caller)
        query = request.query_params
        limit = _int_param(query.get("limit"), "limit", default=100, low=1, high=1000)
        event = query.get("event") or None
        if event is not None and event not in _ALERT_EVENTS:
            raise Refusal(
                400,
                "event must be one of " + ", ".join(sorted(_ALERT_EVENTS)) + ".",
                "invalid_value",
                param="event",
            )
        if self.alerts is None:
            return _json(AlertHistory(data=[]))
        try:
            entries = await self.alerts.history(limit=1000 if event else limit, tenant=tenant)
        except STORE_UNAVAILABLE:
            raise _alerts_unavailable() from None
        if caller.role == "tenant":
            # A tenant sees deliveries to its own webhooks only, not the operator's.
            own = {
                d.id
                for d in self.live.current.config.alerts.destinations
                if d.tenant == caller.tenant
            }
            own.update(w.id for w in await self.alerts.webhooks(caller.tenant or ""))
            entries = [e for e in entries if e.destination is None or e.destination in own]
        if event is not None:
            entries = [e for e in entries if e.event == event][:limit]
        return _json(AlertHistory(data=entries))

    async def _alert_rules(self, request: Request, caller: Caller) -> Response:
        if request.method == "PUT":
            return await self._replace_alert_rules(request, caller)
        if request.method == "DELETE":
            return await self._drop_alert_rules(request, caller)
        if request.method not in ("GET", "HEAD"):
            raise _method(request)
        self._allow(caller, "admin", "read-only")
        rules = list(rules_in_force(self.live.current.config.alerts))
        return _json(AlertRuleList(data=rules))

    async def _replace_alert_rules(self, request: Request, caller: Caller) -> Response:
        """New rules for the next evaluation, checked like the file's. Like the migration
        rules, with a shared registry a change is kept there and reaches every replica (it
        wins over the file's until deleted); without one it reaches this process only: it
        lasts until the file is reloaded, and is refused when several processes serve
        (change the file and reload them instead)."""
        shared = self.rules_writer.shared
        if caller.role == "admin" and self._processes > 1 and not shared:
            # Before the registry's own refusal, which speaks of tenants.
            raise Refusal(
                409,
                "Alert rules changed here would reach only this process: change them in the "
                "configuration file and reload every process (or set gateway.registry_url to "
                "keep them in a shared registry).",
                "alert_rules_not_shared",
            )
        self._allow(caller, "admin", write=True)
        try:
            body = msgspec.json.decode(await request.body(), type=AlertRuleList)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise Refusal(400, f"Invalid body: {exc}", "invalid_value") from None
        # Checked over what they will apply to: the file's settings, or with a shared
        # registry the configuration in force (its tenants are the registry's, brought up to
        # date first: another replica may have just added the tenant named).
        if shared:
            await self.rules_writer.sync.refresh()
        base = self.live.current.config if shared else self.live.file_config
        try:
            # ``replace`` runs the configuration's own checks (the names rules refer to).
            alerts = msgspec.structs.replace(base.alerts, rules=list(body.data))
            config = msgspec.structs.replace(base, alerts=alerts)
        except msgspec.ValidationError as exc:
            raise Refusal(400, f"Invalid rules: {exc}", "invalid_value") from None
        if shared:
            document = msgspec.json.encode(list(body.data))
            await self.rules_writer.write(
                request, caller, ALERT_RULES, document, "alert_rules.update"
            )
        else:
            self.live.replace(config)
        log.info("alert rules changed", actor=f"{caller.role}:{caller.id}", rules=len(body.data))
        return _json(AlertRuleList(data=list(rules_in_force(self.live.current.config.alerts))))

    async def _drop_alert_rules(self, request: Request, caller: Caller) -> Response:
        """Back to the file's alert rules on every replica (a shared registry only)."""
        if caller.role == "admin" and not self.rules_writer.shared:
            raise Refusal(
                409,
                "This gateway keeps no alert rules of its own: reload the file to put its "
                "rules back.",
                "alert_rules_not_shared",
            )
        self._allow(caller, "admin", write=True)
        await self.rules_writer.remove(request, caller, ALERT_RULES, "alert_rules.delete")
        log.info("alert rules back to the file's", actor=f"{caller.role}:{caller.id}")
        return _json(AlertRuleList(data=list(rules_in_force(self.live.current.config.alerts))))

    async def _active_alerts(self, request: Request, caller: Caller) -> Response:
        tenant = self._alert_tenant(request, caller)
        if self.alerts is None:
            return _json(AlertList(data=[]))
        try:
            alerts = await self.alerts.active(tenant=tenant)
        except STORE_UNAVAILABLE:
            raise _alerts_unavailable() from None
        return _json(AlertList(data=alerts))

    async def _webhook_owner(self, request: Request, caller: Caller, *roles: str) -> str:
        tenant_id: str = request.path_params["tenant_id"]
        self._allow(caller, *roles, tenant_id=tenant_id)
        if await self.store.get(tenant_id) is None:
            raise _not_found(tenant_id)
        return tenant_id

    async def _webhooks(self, request: Request, caller: Caller) -> Response:
        if request.method in ("GET", "HEAD"):
            tenant_id = await self._webhook_owner(request, caller, "admin", "read-only", "tenant")
            found = await self._engine().webhooks(tenant_id) if self.alerts else []
            return _json(WebhookList(data=[_webhook_out(w) for w in found]))
        if request.method != "POST":
            raise _method(request)
        tenant_id = await self._webhook_owner(request, caller, "admin", "tenant")
        wanted = _decode(await request.body(), WebhookCreate)
        try:
            webhook = await self._engine().register_webhook(
                tenant_id, wanted.url, fmt=wanted.format, min_severity=wanted.min_severity
            )
        except WebhookRefused as refused:
            raise Refusal(400, f"{refused}.", "invalid_value", param=refused.param) from None
        except STORE_UNAVAILABLE:
            raise _alerts_unavailable() from None
        out = _webhook_out(webhook)
        created = WebhookCreated(**msgspec.structs.asdict(out), secret=webhook.secret)
        return _json(created, 201)

    async def _webhook(self, request: Request, caller: Caller) -> Response:
        if request.method != "DELETE":
            raise _method(request)
        tenant_id = await self._webhook_owner(request, caller, "admin", "tenant")
        webhook_id: str = request.path_params["webhook_id"]
        try:
            deleted = await self._engine().delete_webhook(tenant_id, webhook_id)
        except STORE_UNAVAILABLE:
            raise _alerts_unavailable() from None
        if not deleted:
            raise Refusal(404, f"No webhook {webhook_id!r}.", "not_found", param="webhook_id")
        return _json(WebhookDeleted(id=webhook_id, deleted=True))

    def _engine(self) -> AlertEngine:
        if self.alerts is None:
            raise Refusal(
                409,
                "Alerts are off on this gateway (alerts.tenant_webhooks is not set).",
                "webhooks_disabled",
            )
        return self.alerts


def _balance_store_down() -> Refusal:
    # The journal holds the credit already: the same retry completes it, once.
    return Refusal(
        503,
        "The balance store cannot be reached; retry the same request (with the same "
        "Idempotency-Key or event): it is credited once.",
        "balance_store_unavailable",
    )


def _low(tenant: Tenant) -> int:
    low = tenant.low_balance_usd
    return usd_to_nanousd(low) if low is not None else 0


def _credit_out(credit: Credit) -> CreditOut:
    entry = credit.entry
    return CreditOut(
        id=entry.id,
        tenant=entry.tenant_id,
        kind=entry.kind,
        amount_nanousd=entry.amount_nanousd,
        amount_usd=nanousd_to_usd(entry.amount_nanousd),
        created_at=entry.at,
        note=entry.note,
    )


def _webhook_out(webhook: TenantWebhook) -> WebhookOut:
    return WebhookOut(
        id=webhook.id,
        tenant=webhook.tenant,
        url=webhook.url,
        format=webhook.format,
        min_severity=webhook.min_severity,
        created_at=webhook.created_at,
    )


_ALERT_EVENTS: Final = frozenset({"fired", "resolved", "delivered", "failed", "dropped"})


def _alerts_unavailable() -> Refusal:
    return Refusal(503, "The alert store cannot be reached; retry shortly.", "alerts_unavailable")


def _method(request: Request) -> Refusal:
    return Refusal(
        405, f"{request.method} is not supported on {request.url.path}.", "method_not_allowed"
    )


def _precondition(current: int) -> Refusal:
    return Refusal(
        412,
        f"The tenant changed: it is at version {current}. Read it again and retry.",
        "version_mismatch",
        param="If-Match",
    )


def _int_param(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise Refusal(
            400, f"{name} must be a whole number from {low} to {high}.", "invalid_value", param=name
        )
    return int(raw)


def _float_param(raw: str | None, name: str) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise Refusal(400, f"{name} must be a Unix time.", "invalid_value", param=name)
    return value


def _audit_csv(entries: list[AuditEntry]) -> bytes:
    out = io.StringIO()
    fields = list(AuditEntry.__struct_fields__)
    writer = csv.writer(out)
    writer.writerow(fields)
    for entry in entries:
        writer.writerow([_csv_value(getattr(entry, f)) for f in fields])
    return out.getvalue().encode()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict):
        return msgspec.json.encode(value).decode()
    return value


def _patched(tenant: Tenant, patch: TenantPatch) -> Tenant:
    changes: dict[str, Any] = {}
    for name in patch.__struct_fields__:
        value = getattr(patch, name)
        if value is msgspec.UNSET:
            continue
        if name == "limits":
            try:
                value = limits_patched(tenant.limits, value)
            except msgspec.ValidationError as exc:
                raise Refusal(
                    400, f"Invalid limits: {exc}", "invalid_value", param=_param_of(exc, "limits.")
                ) from None
        changes[name] = value
    return _tenant({**msgspec.structs.asdict(tenant), **changes})


def _find_key(tenant: Tenant, key_id: str) -> ApiKey:
    for key in tenant.keys:
        if key.id == key_id:
            return key
    raise Refusal(
        404, f"No key {key_id!r} for tenant {tenant.id!r}.", "key_not_found", param="key_id"
    )


def _live_keys(keys: list[ApiKey], now: float) -> list[ApiKey]:
    """Keys minus the expired ones (they work nowhere any more; revoked ones stay listed)."""
    return [k for k in keys if k.expires_at is None or k.expires_at > now]


def _replace_key(tenant: Tenant, key: ApiKey, now: float) -> Tenant:
    keys = [key if k.id == key.id else k for k in tenant.keys]
    return msgspec.structs.replace(tenant, keys=_live_keys(keys, now))


def _with_key(tenant: Tenant, key: ApiKey, now: float) -> Tenant:
    keys = _live_keys(list(tenant.keys), now)
    if any(k.id == key.id for k in keys):
        raise Refusal(409, f"Key id {key.id!r} is taken.", "key_exists", param="id")
    if sum(not k.revoked for k in keys) >= MAX_KEYS:
        raise Refusal(
            409, f"A tenant holds at most {MAX_KEYS} live keys; revoke one first.", "too_many_keys"
        )
    return msgspec.structs.replace(tenant, keys=[*keys, key])
