"""``tenantware tenants|keys|balances|shadow ...``: the admin API from a shell.

They talk to a running gateway (``--url`` or ``$TENANTWARE_URL``, default
``http://127.0.0.1:8080``) with an admin key (``--admin-key`` or ``$TENANTWARE_ADMIN_KEY``),
so an operator never edits Redis by hand. Answers print as JSON; a refusal prints the
gateway's error message and exits with status 1.

``tenantware registry export|import --config FILE`` move tenants (with their key hashes,
which the API never shows) between a file and the shared registry of ``gateway.registry_url``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["add_commands"]

_DEFAULT_URL = "http://127.0.0.1:8080"


def _client(args: argparse.Namespace) -> Any:
    import httpx

    key = args.admin_key or os.environ.get("TENANTWARE_ADMIN_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = args.url or os.environ.get("TENANTWARE_URL") or _DEFAULT_URL
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=args.timeout)


def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    check: str | None = None,
) -> int:
    """Call the API and print its answer; ``check``: a boolean field of the answer that
    must be true for exit status 0."""
    import httpx

    try:
        with _client(args) as client:
            response = client.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        print(f"tenantware: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": {"message": response.text[:500]}}
    if response.status_code >= 300:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        param = f" ({error['param']})" if error.get("param") else ""
        print(f"tenantware: {response.status_code}: {error.get('message')}{param}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2))
    if check is not None and not payload.get(check):
        return 1
    return 0


def _shadow_report(args: argparse.Namespace) -> int:
    """``tenantware shadow report``: the migration comparison report (JSON or CSV)."""
    import httpx

    params = {"format": args.format}
    for name in ("since", "until", "rule"):
        value = getattr(args, name)
        if value:
            params[name] = value
    if args.format == "json":
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return _call(args, "GET", f"/admin/migration/report?{query}")
    try:
        with _client(args) as client:
            response = client.get("/admin/migration/report", params=params)
    except httpx.HTTPError as exc:
        print(f"tenantware: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1
    if response.status_code >= 300:
        print(f"tenantware: {response.status_code}: {response.text[:500]}", file=sys.stderr)
        return 1
    sys.stdout.write(response.text)
    return 0


def _shadow_rollback(args: argparse.Namespace) -> int:
    """``tenantware shadow rollback RULE UPSTREAM``: the candidate's shares to 0, at once."""
    body = {"canary_percent": 0, "shadow_percent": 0}
    return _call(
        args, "PATCH", f"/admin/migration/rules/{args.rule}/candidates/{args.upstream}", body
    )


def _limits(pairs: list[str] | None) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"tenantware: --limit takes NAME=VALUE, got {pair!r}")
        limits[name] = None if value in ("", "none") else json.loads(value)
    return limits


def _tenant_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("name", "tier", "weight", "cost_center"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.model:
        fields["allowed_models"] = args.model
    limits = _limits(args.limit)
    if limits:
        fields["limits"] = limits
    return fields


def _tenants_list(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/admin/tenants?limit={args.limit}")


def _tenants_get(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/admin/tenants/{args.tenant}")


def _tenants_create(args: argparse.Namespace) -> int:
    headers = {"idempotency-key": args.idempotency_key} if args.idempotency_key else None
    body = {"id": args.tenant, **_tenant_fields(args)}
    return _call(args, "POST", "/admin/tenants", body, headers)


def _tenants_update(args: argparse.Namespace) -> int:
    headers = {"if-match": args.if_match} if args.if_match else None
    return _call(args, "PATCH", f"/admin/tenants/{args.tenant}", _tenant_fields(args), headers)


def _tenants_disable(args: argparse.Namespace) -> int:
    body = {"disabled": args.command_name == "disable"}
    return _call(args, "PATCH", f"/admin/tenants/{args.tenant}", body)


def _tenants_delete(args: argparse.Namespace) -> int:
    return _call(args, "DELETE", f"/admin/tenants/{args.tenant}")


def _keys_list(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/admin/tenants/{args.tenant}/keys")


def _keys_issue(args: argparse.Namespace) -> int:
    body = {"id": args.id} if args.id else {}
    return _call(args, "POST", f"/admin/tenants/{args.tenant}/keys", body)


def _keys_rotate(args: argparse.Namespace) -> int:
    path = f"/admin/tenants/{args.tenant}/keys/{args.key_id}/rotate"
    return _call(args, "POST", path, {"grace_s": args.grace_s})


def _keys_revoke(args: argparse.Namespace) -> int:
    return _call(args, "POST", f"/admin/tenants/{args.tenant}/keys/{args.key_id}/revoke")


def _balances_show(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/admin/tenants/{args.tenant}/balance")


def _balances_topup(args: argparse.Namespace) -> int:
    import uuid

    key = args.idempotency_key or f"cli-{uuid.uuid4()}"
    if not args.idempotency_key:
        # Printed so that the operator can retry this exact top-up without crediting twice.
        print(f"tenantware: Idempotency-Key {key}", file=sys.stderr)
    body = {"amount_usd": args.amount_usd, "note": args.note}
    path = f"/admin/tenants/{args.tenant}/balance/topups"
    return _call(args, "POST", path, body, {"idempotency-key": key})


def _balances_journal(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/admin/tenants/{args.tenant}/balance/journal?limit={args.limit}")


def _balances_verify(args: argparse.Namespace) -> int:
    return _call(args, "GET", "/admin/balances/verify", check="ok")


def _balances_reconcile(args: argparse.Namespace) -> int:
    path = f"/admin/tenants/{args.tenant}/balance/reconcile"
    return _call(args, "POST", path, check="ok")


def _balances_codes(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"count": args.count, "amount_usd": args.amount_usd}
    if args.tenant:
        body["tenant_id"] = args.tenant
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    return _call(args, "POST", "/admin/redemption-codes", body)


def _balances_redeem(args: argparse.Namespace) -> int:
    path = f"/admin/tenants/{args.tenant}/balance/redeem"
    return _call(args, "POST", path, {"code": args.code})


def _registry_of(args: argparse.Namespace) -> Any:
    from tenantware.config import expanded_url, load_config
    from tenantware.registry import open_registry

    settings = load_config(args.config).gateway
    url = expanded_url(args.registry_url or settings.registry_url, "gateway.registry_url")
    if not url:
        raise SystemExit("tenantware: no shared registry: set gateway.registry_url")
    return open_registry(url, prefix=settings.redis_prefix)


def _registry_export(args: argparse.Namespace) -> int:
    import anyio
    import msgspec

    async def export() -> Any:
        store = _registry_of(args)
        try:
            return await store.load()
        finally:
            await store.aclose()

    state = anyio.run(export)
    tenants = [state.records[name].tenant for name in sorted(state.records)]
    document = {"tenants": msgspec.to_builtins(tenants)}
    print(json.dumps(document, indent=2))
    return 0


def _registry_import(args: argparse.Namespace) -> int:
    import time

    import anyio

    from tenantware.config import load_config
    from tenantware.registry.store import AuditEntry

    tenants = load_config(args.source).tenants

    async def run() -> int:
        store = _registry_of(args)
        try:
            if await store.seed(list(tenants)):
                return len(tenants)
            for tenant in tenants:
                record = await store.get(tenant.id)
                audit = AuditEntry(
                    at=time.time(),
                    actor="cli:registry-import",
                    action="tenant.update" if record else "tenant.create",
                    tenant=tenant.id,
                    before_version=record.version if record else 0,
                )
                await store.put(tenant, expect=None, audit=audit)
            return len(tenants)
        finally:
            await store.aclose()

    count = anyio.run(run)
    print(f"imported {count} tenants from {args.source}", file=sys.stderr)
    return 0


@contextlib.asynccontextmanager
async def _stores_of(args: argparse.Namespace) -> AsyncIterator[tuple[Any, Any, Any]]:
    """The registry, ledger and log store a configuration file names, closed after."""
    from tenantware.config import expanded_url, load_config
    from tenantware.gateway import ledger_url
    from tenantware.logbook import open_log_store
    from tenantware.metering.ledger import open_ledger
    from tenantware.registry import open_registry

    config = load_config(args.config)
    settings = config.gateway
    url = ledger_url(config)
    registry = open_registry(
        expanded_url(settings.registry_url, "gateway.registry_url"),
        tenants=config.tenants,
        prefix=settings.redis_prefix,
    )
    ledger, logs = open_ledger(url), open_log_store(url)
    try:
        yield registry, ledger, logs
    finally:
        await logs.aclose()
        await ledger.aclose()
        await registry.aclose()


def _balances_of(args: argparse.Namespace, ledger: Any) -> tuple[Any, Any]:
    """(stores, balances) of a deployment whose quota store is shared (``gateway.redis_url``):
    an import gives it the restored balance. ``(None, None)`` otherwise: each gateway process
    restores balances from the journal at its start."""
    from tenantware.balances import Balances
    from tenantware.config import expanded_url, load_config
    from tenantware.metering.ledger import BalanceJournal
    from tenantware.stores import open_stores

    settings = load_config(args.config).gateway
    redis_url = expanded_url(settings.redis_url, "gateway.redis_url")
    if redis_url is None or not isinstance(ledger, BalanceJournal):
        return None, None
    stores = open_stores(
        redis_url,
        prefix=settings.redis_prefix,
        timeout_s=max(settings.redis_timeout_s, 5.0),
        on_failure="closed",
    )
    return stores, Balances(stores.quota_store(), ledger)


def _tenant_export(args: argparse.Namespace) -> int:
    import anyio

    from tenantware.tenantdata.archive import encode_archive, export_tenant

    async def run() -> bytes:
        async with _stores_of(args) as (registry, ledger, logs):
            await ledger.open()
            archive = await export_tenant(args.tenant, registry=registry, ledger=ledger, logs=logs)
            return encode_archive(archive)

    try:
        data = anyio.run(run)
    except LookupError as exc:
        print(f"tenantware: {exc.args[0]}", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.buffer.write(data + b"\n")
    else:
        with open(args.output, "wb") as file:
            file.write(data)
        print(f"exported {args.tenant} to {args.output}", file=sys.stderr)
    return 0


def _tenant_import(args: argparse.Namespace) -> int:
    import anyio
    import msgspec

    from tenantware.tenantdata.archive import ArchiveConflict, decode_archive, import_tenant

    with open(args.archive, "rb") as file:
        data = file.read()

    async def run() -> Any:
        async with _stores_of(args) as (registry, ledger, logs):
            if not registry.shared:
                raise ArchiveConflict(
                    "the tenants of this deployment are its configuration file: set "
                    "gateway.registry_url to import into a shared registry"
                )
            await ledger.open()
            stores, balances = _balances_of(args, ledger)
            try:
                return await import_tenant(
                    decode_archive(data),
                    registry=registry,
                    ledger=ledger,
                    logs=logs,
                    balances=balances,
                )
            finally:
                if stores is not None:
                    await stores.aclose()

    try:
        report = anyio.run(run)
    except ArchiveConflict as exc:
        print(f"tenantware: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(msgspec.to_builtins(report), indent=2))
    return 0


def _data_rotate(args: argparse.Namespace) -> int:
    import anyio

    from tenantware.config import load_config
    from tenantware.crypto import KeyRing, MissingMasterKey, key_provider
    from tenantware.logbook.jobs import rotate

    settings = load_config(args.config).data

    async def run() -> tuple[int, int]:
        async with _stores_of(args) as (registry, _ledger, logs):
            ring = KeyRing(key_provider(settings.master_key_env, settings.master_key_file), logs)
            current = (await ring.master_keys()).current
            tenants = sorted((await registry.load()).records)
            return await rotate(logs, ring, tenants, batch=args.batch), current

    try:
        count, version = anyio.run(run)
    except MissingMasterKey as exc:
        print(f"tenantware: {exc}", file=sys.stderr)
        return 1
    print(f"re-sealed {count} request log rows under master key version {version}")
    return 0


def _data_new_master_key(args: argparse.Namespace) -> int:
    import base64

    print(base64.b64encode(os.urandom(32)).decode())
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"gateway URL ($TENANTWARE_URL, default {_DEFAULT_URL})")
    parser.add_argument("--admin-key", help="admin API key ($TENANTWARE_ADMIN_KEY)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def _fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name")
    parser.add_argument("--tier")
    parser.add_argument("--weight", type=float)
    parser.add_argument("--cost-center", dest="cost_center")
    parser.add_argument("--model", action="append", help="an allowed model (repeat)")
    parser.add_argument(
        "--limit",
        action="append",
        metavar="NAME=VALUE",
        help="a limit, e.g. requests_per_minute=600 (none: back to the tier's)",
    )


def add_commands(commands: Any) -> None:
    """Add ``tenants``, ``keys``, ``balances`` and ``registry`` to the subcommands."""
    tenants = commands.add_parser("tenants", help="tenants through a gateway's admin API")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)

    def command(parent: Any, name: str, func: Any, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=help)
        _common(parser)
        parser.set_defaults(func=func, command_name=name)
        return parser

    listing = command(tenant_commands, "list", _tenants_list, "list tenants")
    listing.add_argument("--limit", type=int, default=100)
    command(tenant_commands, "get", _tenants_get, "show one tenant").add_argument("tenant")
    create = command(tenant_commands, "create", _tenants_create, "create a tenant")
    create.add_argument("tenant")
    create.add_argument("--idempotency-key")
    _fields(create)
    update = command(tenant_commands, "update", _tenants_update, "change a tenant")
    update.add_argument("tenant")
    update.add_argument("--if-match", help="the version read before (412 if it changed)")
    _fields(update)
    for name, text in (("disable", "refuse its keys"), ("enable", "accept its keys again")):
        command(tenant_commands, name, _tenants_disable, text).add_argument("tenant")
    command(tenant_commands, "delete", _tenants_delete, "delete a tenant").add_argument("tenant")
    export = tenant_commands.add_parser(
        "export", help="write everything of one tenant as one archive (from the stores)"
    )
    export.add_argument("tenant")
    export.add_argument("--config", required=True, help="the gateway's configuration file")
    export.add_argument("--output", "-o", help="archive file (default: standard output)")
    export.set_defaults(func=_tenant_export)
    restore = tenant_commands.add_parser(
        "import", help="restore a tenant archive into this deployment (idempotent)"
    )
    restore.add_argument("archive")
    restore.add_argument("--config", required=True, help="the gateway's configuration file")
    restore.set_defaults(func=_tenant_import)
    revoke_key = command(tenant_commands, "revoke-key", _keys_revoke, "revoke a key now")
    revoke_key.add_argument("tenant")
    revoke_key.add_argument("key_id")

    keys = commands.add_parser("keys", help="API keys through a gateway's admin API")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    command(key_commands, "list", _keys_list, "list a tenant's keys").add_argument("tenant")
    issue = command(key_commands, "issue", _keys_issue, "issue a key (printed once)")
    issue.add_argument("tenant")
    issue.add_argument("--id", help="key id (default: generated)")
    rotate = command(key_commands, "rotate", _keys_rotate, "new key; old one valid for a grace")
    rotate.add_argument("tenant")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, default=3600.0)
    revoke = command(key_commands, "revoke", _keys_revoke, "revoke a key now")
    revoke.add_argument("tenant")
    revoke.add_argument("key_id")

    data = commands.add_parser("data", help="tenant data keys: master keys and rotation")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    rotate_parser = data_commands.add_parser(
        "rotate", help="re-seal every tenant's logs under the newest master key (resumable)"
    )
    rotate_parser.add_argument("--config", required=True, help="the gateway's configuration file")
    rotate_parser.add_argument("--batch", type=int, default=500, help="rows per transaction")
    rotate_parser.set_defaults(func=_data_rotate)
    data_commands.add_parser(
        "new-master-key", help="print a new random master key (base64 of 32 bytes)"
    ).set_defaults(func=_data_new_master_key)
    balances = commands.add_parser("balances", help="prepaid balances through the admin API")
    balance_commands = balances.add_subparsers(dest="balances_command", required=True)
    command(balance_commands, "show", _balances_show, "a tenant's balance").add_argument("tenant")
    topup = command(balance_commands, "topup", _balances_topup, "credit a prepaid balance")
    topup.add_argument("tenant")
    topup.add_argument("amount_usd", help="amount in USD, e.g. 25 or 12.50")
    topup.add_argument(
        "--idempotency-key", help="retry with the same key: credited once (default: new)"
    )
    topup.add_argument("--note", default="", help="kept in the journal")
    journal = command(balance_commands, "journal", _balances_journal, "a balance's journal")
    journal.add_argument("tenant")
    journal.add_argument("--limit", type=int, default=100)
    command(
        balance_commands,
        "verify",
        _balances_verify,
        "compare every balance with its journal (exit 1 on a difference)",
    )
    command(
        balance_commands,
        "reconcile",
        _balances_reconcile,
        "set a balance back to its journal's sum (when no request of it is in flight)",
    ).add_argument("tenant")
    codes = command(balance_commands, "codes", _balances_codes, "create redemption codes")
    codes.add_argument("count", type=int)
    codes.add_argument("amount_usd")
    codes.add_argument("--tenant", help="only this tenant may redeem them")
    codes.add_argument("--expires-at", type=float, help="Unix time")
    redeem = command(balance_commands, "redeem", _balances_redeem, "redeem a code")
    redeem.add_argument("tenant")
    redeem.add_argument("code")
    shadow = commands.add_parser("shadow", help="migration trials through the admin API")
    shadow_commands = shadow.add_subparsers(dest="shadow_command", required=True)
    report = command(shadow_commands, "report", _shadow_report, "the comparison report")
    report.add_argument("--since", help="2026-11-01, 24h, 7d (default: everything kept)")
    report.add_argument("--until", help="end (exclusive), same forms as --since")
    report.add_argument("--rule", help="one rule (default: every rule)")
    report.add_argument("--format", choices=["json", "csv"], default="json")
    rollback = command(shadow_commands, "rollback", _shadow_rollback, "a candidate's shares to 0")
    rollback.add_argument("rule")
    rollback.add_argument("upstream")

    registry = commands.add_parser("registry", help="move tenants between a file and Redis")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True)
    for name, func, text in (
        ("export", _registry_export, "print the shared registry's tenants as JSON config"),
        ("import", _registry_import, "write a file's tenants into the shared registry"),
    ):
        parser = registry_commands.add_parser(name, help=text)
        parser.add_argument("--config", required=True, help="the gateway's configuration file")
        parser.add_argument("--registry-url", help="overrides gateway.registry_url")
        if name == "import":
            parser.add_argument(
                "source", help="file whose [[tenants]] are written (created or replaced)"
            )
        parser.set_defaults(func=func)
