"""``/admin/openapi.json``: the OpenAPI 3.1 document of the admin API.

Schemas come from the msgspec structs the routes decode and encode
(``msgspec.json.schema_components``), so the document cannot drift from the code; the paths
are written here, one entry per route.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from tenantware.admin.migration import CandidateShares, MigrationReport
from tenantware.admin.schemas import (
    AdminKeyIssue,
    AdminKeyIssued,
    AdminKeyList,
    AlertHistory,
    AlertList,
    AlertRuleList,
    AuditList,
    BalanceOut,
    BalanceReconciled,
    BalanceVerify,
    CodesCreate,
    CodesCreated,
    CreditOut,
    ErrorBody,
    JournalList,
    KeyIssue,
    KeyIssued,
    KeyList,
    KeyOut,
    KeyRotate,
    LogList,
    PaymentAck,
    PolicyOut,
    PolicyPatch,
    Redeem,
    TenantCreate,
    TenantList,
    TenantOut,
    TenantPatch,
    TenantStorage,
    TierList,
    TopUp,
    UpstreamKeyIn,
    UpstreamKeyOut,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
)
from tenantware.config import MigrationSettings
from tenantware.dashboard.schemas import LiveView, MigrationView, UsageView

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _body(kind: type) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(kind)}}}


def _answer(kind: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(kind)}}}


_ERROR = {
    "description": "Refused (OpenAI error shape)",
    "content": {"application/json": {"schema": _ref(ErrorBody)}},
}


def _operation(
    summary: str,
    roles: str,
    ok: tuple[str, type, str],
    *,
    body: type | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[str, ...] = ("400", "401", "403", "404"),
) -> dict[str, Any]:
    status, kind, description = ok
    operation: dict[str, Any] = {
        "summary": summary,
        "description": f"Roles: {roles}.",
        "responses": {
            status: _answer(kind, description),
            **dict.fromkeys(errors, _ERROR),
            # 405 for another method, 503 while a shared registry cannot be reached.
            "default": _ERROR,
        },
    }
    if body is not None:
        operation["requestBody"] = _body(body)
    if params:
        operation["parameters"] = params
    return operation


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _header(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": schema}


_IF_MATCH = _header("If-Match", {"type": "string", "pattern": r'^(W/)?"?[0-9]+"?$'})
_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})


class _Deleted(msgspec.Struct, frozen=True, kw_only=True):
    object: str
    id: str
    deleted: bool


class _UpstreamKeyDeleted(msgspec.Struct, frozen=True, kw_only=True):
    object: str
    upstream: str
    deleted: bool


class _AdminRevoked(msgspec.Struct, frozen=True, kw_only=True):
    object: str
    id: str
    revoked: bool


@functools.cache
def openapi_document() -> bytes:
    """The document, built once per process."""
    kinds = [
        AdminKeyIssue,
        AdminKeyIssued,
        AdminKeyList,
        _AdminRevoked,
        AlertHistory,
        AlertList,
        AlertRuleList,
        AuditList,
        ErrorBody,
        KeyIssue,
        KeyIssued,
        KeyList,
        KeyOut,
        KeyRotate,
        LogList,
        TenantCreate,
        TenantList,
        TenantOut,
        TenantPatch,
        TenantStorage,
        TierList,
        WebhookCreate,
        WebhookCreated,
        WebhookDeleted,
        WebhookList,
        _Deleted,
        BalanceOut,
        BalanceReconciled,
        BalanceVerify,
        CodesCreate,
        CodesCreated,
        CreditOut,
        JournalList,
        PaymentAck,
        PolicyOut,
        PolicyPatch,
        Redeem,
        TopUp,
        UpstreamKeyIn,
        UpstreamKeyOut,
        _UpstreamKeyDeleted,
        UsageView,
        LiveView,
        MigrationView,
        MigrationReport,
        MigrationSettings,
        CandidateShares,
    ]
    _, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    tenant = [_path_param("tenant_id")]
    key = [*tenant, _path_param("key_id")]
    paths: dict[str, Any] = {
        "/admin/tenants": {
            "get": _operation(
                "List tenants (a tenant key sees only its own)",
                "admin, read-only, tenant",
                ("200", TenantList, "A page of tenants, by id"),
                params=[_LIMIT, _query("after", {"type": "string"})],
            ),
            "post": _operation(
                "Create a tenant",
                "admin",
                ("201", TenantOut, "The new tenant"),
                body=TenantCreate,
                params=[_header("Idempotency-Key", {"type": "string", "maxLength": 255})],
                errors=("400", "401", "403", "409", "422"),
            ),
        },
        "/admin/tenants/{tenant_id}": {
            "get": _operation(
                "Read a tenant",
                "admin, read-only, its own tenant",
                ("200", TenantOut, "The tenant; its ETag is its version"),
                params=tenant,
            ),
            "patch": _operation(
                "Change a tenant (limits, tier, weight, models, disabled...)",
                "admin",
                ("200", TenantOut, "The changed tenant"),
                body=TenantPatch,
                params=[*tenant, _IF_MATCH],
                errors=("400", "401", "403", "404", "412"),
            ),
            "delete": _operation(
                "Delete a tenant and its keys",
                "admin",
                ("200", _Deleted, "Deleted"),
                params=[*tenant, _IF_MATCH],
                errors=("400", "401", "403", "404", "412"),
            ),
        },
        "/admin/tenants/{tenant_id}/keys": {
            "get": _operation(
                "List a tenant's keys (id and prefix; never the key or its hash)",
                "admin, read-only, its own tenant",
                ("200", KeyList, "The keys"),
                params=tenant,
            ),
            "post": _operation(
                "Issue a key (shown once in the answer)",
                "admin",
                ("201", KeyIssued, "The new key"),
                body=KeyIssue,
                params=[*tenant, _IF_MATCH],
                errors=("400", "401", "403", "404", "409", "412"),
            ),
        },
        "/admin/tenants/{tenant_id}/logs": {
            "get": _operation(
                "Read a tenant's request logs, decrypted, newest first (logging is opt-in)",
                "admin, its own tenant",
                ("200", LogList, "The logs"),
                params=[
                    *tenant,
                    _LIMIT,
                    _query("since", {"type": "number"}),
                    _query("until", {"type": "number"}),
                ],
                errors=("400", "401", "403", "404", "503"),
            ),
        },
        "/admin/tenants/{tenant_id}/storage": {
            "get": _operation(
                "Bytes of a tenant's cached answers and request logs, and its quotas",
                "admin, read-only, its own tenant",
                ("200", TenantStorage, "Storage use"),
                params=tenant,
                errors=("401", "403", "404", "503"),
            ),
        },
        "/admin/tenants/{tenant_id}/keys/{key_id}/rotate": {
            "post": _operation(
                "Rotate a key: a new key now, the old one valid for grace_s",
                "admin, its own tenant",
                ("201", KeyIssued, "The new key, and the old one's expiry"),
                body=KeyRotate,
                params=[*key, _IF_MATCH],
                errors=("400", "401", "403", "404", "409", "412"),
            ),
        },
        "/admin/tenants/{tenant_id}/keys/{key_id}/revoke": {
            "post": _operation(
                "Revoke a key at once (every replica refuses it within a second)",
                "admin",
                ("200", KeyOut, "The revoked key"),
                params=[*key, _IF_MATCH],
                errors=("400", "401", "403", "404", "412"),
            ),
        },
        "/admin/keys": {
            "get": _operation(
                "List admin keys (id, role, prefix, where defined)",
                "admin",
                ("200", AdminKeyList, "The admin keys"),
                errors=("401", "403"),
            ),
            "post": _operation(
                "Issue an admin key (shown once in the answer)",
                "admin",
                ("201", AdminKeyIssued, "The new admin key"),
                body=AdminKeyIssue,
                errors=("400", "401", "403", "409"),
            ),
        },
        "/admin/keys/{key_id}/revoke": {
            "post": _operation(
                "Revoke an admin key issued through the API",
                "admin",
                ("200", _AdminRevoked, "Revoked"),
                params=[_path_param("key_id")],
                errors=("401", "403", "404"),
            )
        },
        "/admin/tiers": {
            "get": _operation(
                "List tiers (from the configuration file)",
                "admin, read-only",
                ("200", TierList, "The tiers"),
                errors=("401", "403"),
            )
        },
        "/admin/audit": {
            "get": _operation(
                "Read the audit trail, newest first",
                "admin, read-only",
                ("200", AuditList, "Audit entries"),
                params=[
                    _LIMIT,
                    _query("tenant", {"type": "string"}),
                    _query("action", {"type": "string"}),
                    _query("actor", {"type": "string"}),
                    _query("since", {"type": "number"}),
                    _query("until", {"type": "number"}),
                    _query("format", {"type": "string", "enum": ["json", "csv"]}),
                ],
                errors=("400", "401", "403", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/policy": {
            "get": _operation(
                "Read a tenant's policy (routing, feature flags, own upstream keys' hints)",
                "admin, read-only, its own tenant",
                ("200", PolicyOut, "The policy; its ETag is the tenant's version"),
                params=tenant,
            ),
            "patch": _operation(
                "Change a tenant's policy (each field named is replaced whole)",
                "admin; its own tenant where self_service is on",
                ("200", PolicyOut, "The changed policy"),
                body=PolicyPatch,
                params=[*tenant, _IF_MATCH],
                errors=("400", "401", "403", "404", "409", "412"),
            ),
        },
        "/admin/tenants/{tenant_id}/upstream-keys/{upstream}": {
            "put": _operation(
                "Register the tenant's own key for an upstream (stored sealed, never shown)",
                "admin; its own tenant where self_service is on",
                ("201", UpstreamKeyOut, "Registered: the upstream and the key's last characters"),
                body=UpstreamKeyIn,
                params=[*tenant, _path_param("upstream"), _IF_MATCH],
                errors=("400", "401", "403", "404", "409", "412"),
            ),
            "delete": _operation(
                "Remove the tenant's own key for an upstream (the gateway's key applies again)",
                "admin; its own tenant where self_service is on",
                ("200", _UpstreamKeyDeleted, "Removed"),
                params=[*tenant, _path_param("upstream"), _IF_MATCH],
                errors=("400", "401", "403", "404", "409", "412"),
            ),
        },
        "/admin/tenants/{tenant_id}/balance": {
            "get": _operation(
                "Read a tenant's prepaid balance",
                "admin, read-only, its own tenant",
                ("200", BalanceOut, "The balance (in-flight requests already taken out)"),
                params=tenant,
                errors=("401", "403", "404", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/balance/topups": {
            "post": _operation(
                "Top up a prepaid balance (credited once per Idempotency-Key)",
                "admin",
                ("201", CreditOut, "The credit (the same answer for every retry)"),
                body=TopUp,
                params=[
                    *tenant,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    },
                ],
                errors=("400", "401", "403", "404", "409", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/balance/journal": {
            "get": _operation(
                "Read a tenant's balance journal, newest first",
                "admin, read-only, its own tenant",
                ("200", JournalList, "Journal entries"),
                params=[*tenant, _LIMIT],
                errors=("400", "401", "403", "404", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/balance/redeem": {
            "post": _operation(
                "Redeem a single-use code into the balance",
                "admin, its own tenant",
                ("201", CreditOut, "The credit (a retry by the same tenant gets it again)"),
                body=Redeem,
                params=tenant,
                errors=("400", "401", "403", "404", "409", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/balance/reconcile": {
            "post": _operation(
                "Set the store's balance back to its journal's sum (a repair, applied once)",
                "admin",
                ("200", BalanceReconciled, "The balance before and after"),
                params=tenant,
                errors=("401", "403", "404", "409", "503"),
            )
        },
        "/admin/redemption-codes": {
            "post": _operation(
                "Create single-use redemption codes (shown once in the answer)",
                "admin",
                ("201", CodesCreated, "The codes"),
                body=CodesCreate,
                errors=("400", "401", "403", "404", "503"),
            )
        },
        "/admin/balances/verify": {
            "get": _operation(
                "Compare every prepaid balance with its journal's sum",
                "admin, read-only",
                ("200", BalanceVerify, "One check per tenant"),
                errors=("401", "403", "503"),
            )
        },
        "/admin/payments/{provider}": {
            "post": {
                **_operation(
                    "A payment provider's webhook (authenticated by its signature)",
                    "none (the provider signs the body)",
                    ("200", PaymentAck, "Acknowledged; credited once per event id"),
                    params=[_path_param("provider")],
                    errors=("400", "404", "409", "422", "503"),
                ),
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            }
        },
        "/admin/alerts": {
            "get": _operation(
                "Read the alert history (fired, resolved, delivered, failed), newest first",
                "admin, read-only; a tenant key reads its own tenant's",
                ("200", AlertHistory, "History entries"),
                params=[
                    _LIMIT,
                    _query("tenant", {"type": "string"}),
                    _query(
                        "event",
                        {
                            "type": "string",
                            "enum": ["fired", "resolved", "delivered", "failed", "dropped"],
                        },
                    ),
                ],
                errors=("400", "401", "403", "404", "503"),
            )
        },
        "/admin/tenants/{tenant_id}/webhooks": {
            "get": _operation(
                "List a tenant's own alert webhooks (never their secrets)",
                "admin, read-only, its own tenant",
                ("200", WebhookList, "The webhooks"),
                params=tenant,
            ),
            "post": _operation(
                "Register a webhook for the tenant's own alerts (its secret is shown once)",
                "admin, its own tenant",
                ("201", WebhookCreated, "The webhook and its signing secret"),
                body=WebhookCreate,
                params=tenant,
                errors=("400", "401", "403", "404", "409", "503"),
            ),
        },
        "/admin/tenants/{tenant_id}/webhooks/{webhook_id}": {
            "delete": _operation(
                "Remove a tenant's webhook",
                "admin, its own tenant",
                ("200", WebhookDeleted, "Removed"),
                params=[*tenant, _path_param("webhook_id")],
                errors=("401", "403", "404", "409", "503"),
            )
        },
        "/admin/alerts/rules": {
            "get": _operation(
                "List the alert rules in force (configured, or the shipped defaults)",
                "admin, read-only",
                ("200", AlertRuleList, "The rules"),
                errors=("401", "403"),
            ),
            "put": _operation(
                "Replace the alert rules (with a shared registry on every replica until "
                "deleted; else this process, until the file is reloaded)",
                "admin",
                ("200", AlertRuleList, "The rules now in force"),
                body=AlertRuleList,
                errors=("400", "401", "403", "409"),
            ),
            "delete": _operation(
                "Drop the alert rules set through the API: the file's apply on every replica "
                "(a shared registry only)",
                "admin",
                ("200", AlertRuleList, "The rules now in force"),
                errors=("401", "403", "404", "409"),
            ),
        },
        "/admin/alerts/active": {
            "get": _operation(
                "List the alerts firing now",
                "admin, read-only; a tenant key reads its own tenant's",
                ("200", AlertList, "Alerts firing"),
                params=[_query("tenant", {"type": "string"})],
                errors=("401", "403", "404", "503"),
            )
        },
    }
    paths["/admin/dashboard/usage"] = {
        "get": _operation(
            "Usage figures of a time range for the dashboard (aggregated by the ledger)",
            "admin, read-only (every tenant); tenant (its own tenant only: another tenant's "
            "id is answered 404)",
            ("200", UsageView, "Totals, a series and breakdowns by model and cost center"),
            params=[
                _query("range", {"type": "string", "enum": ["1h", "24h", "7d", "30d"]}),
                _query("since", {"type": "string"}),
                _query("until", {"type": "string"}),
                _query("tenant", {"type": "string"}),
            ],
            errors=("400", "401", "404", "503"),
        )
    }
    paths["/admin/dashboard/live"] = {
        "get": _operation(
            "The gateway's state now: circuits, admission queues, store, ledger, registry",
            "admin, read-only",
            ("200", LiveView, "Live state of this gateway process"),
            errors=("401", "403"),
        )
    }
    paths["/admin/dashboard/migration"] = {
        "get": _operation(
            "The shadow/canary comparison of a time range: every candidate's shares, state, "
            "report figures and a series (this process's comparisons)",
            "admin, read-only",
            ("200", MigrationView, "One entry per rule and candidate, and their series"),
            params=[
                _query("range", {"type": "string", "enum": ["1h", "24h", "7d", "30d"]}),
                _query("since", {"type": "string"}),
                _query("until", {"type": "string"}),
            ],
            errors=("400", "401", "403"),
        )
    }
    paths["/admin/migration/report"] = {
        "get": _operation(
            "The migration comparison report: per rule and candidate, shadow calls next to "
            "their primaries, canary calls, rollbacks",
            "admin, read-only",
            ("200", MigrationReport, "One row per rule and candidate"),
            params=[
                _query("since", {"type": "string"}),
                _query("until", {"type": "string"}),
                _query("rule", {"type": "string"}),
                _query("format", {"type": "string", "enum": ["json", "csv"]}),
            ],
            errors=("400", "401", "403", "503"),
        )
    }
    paths["/admin/migration/rules"] = {
        "get": _operation(
            "The migration settings in force",
            "admin, read-only",
            ("200", MigrationSettings, "The [migration] settings"),
            errors=("401", "403"),
        ),
        "put": _operation(
            "Replace the migration settings (checked like the file's; for the next request; "
            "with a shared registry on every replica until deleted)",
            "admin",
            ("200", MigrationSettings, "The settings now in force"),
            body=MigrationSettings,
            errors=("400", "401", "403", "409"),
        ),
        "delete": _operation(
            "Drop the migration settings set through the API: the file's apply on every "
            "replica (a shared registry only)",
            "admin",
            ("200", MigrationSettings, "The settings now in force"),
            errors=("401", "403", "404", "409"),
        ),
    }
    paths["/admin/migration/rules/{rule}/candidates/{upstream}"] = {
        "patch": _operation(
            "Change one candidate's canary and shadow shares (0 is the rollback)",
            "admin",
            ("200", MigrationSettings, "The settings now in force"),
            body=CandidateShares,
            params=[_path_param("rule"), _path_param("upstream")],
            errors=("400", "401", "403", "404", "409"),
        )
    }
    report_answer = paths["/admin/migration/report"]["get"]["responses"]["200"]
    report_answer["content"]["text/csv"] = {"schema": {"type": "string"}}  # format=csv
    audit_answer = paths["/admin/audit"]["get"]["responses"]["200"]
    audit_answer["content"]["text/csv"] = {"schema": {"type": "string"}}  # format=csv
    document = {
        "openapi": "3.1.0",
        "info": {"title": "tenantware admin API", "version": "1"},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
    return msgspec.json.encode(document)
