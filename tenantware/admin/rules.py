"""Writes rules changed through the admin API into a shared registry, for every replica.

The migration and alert routes check a change against the file's settings, then hand it here
when the registry is shared: it is written as one versioned document (``registry.rules``),
this process copies the registry at once (the change is in force here when the answer
leaves), and every other process learns of it by pub/sub or its version check, as for a
tenant. Each write is audited like a tenant change: in the registry's trail with it, and in
the ledger's trail when there is one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import msgspec
import structlog
from starlette.requests import Request

from tenantware.admin.auth import Caller
from tenantware.audit import AuditAction, AuditEntry
from tenantware.metering.ledger.auditlog import AuditLog
from tenantware.registry.rules import RuleDocument, RuleName
from tenantware.registry.store import RegistryStore, VersionMismatch
from tenantware.registry.sync import RegistrySync

__all__ = ["RulesWriter"]

log = structlog.get_logger("tenantware.admin")


class RulesWriter:
    """``RulesWriter(store, sync, audit_log=..., refusal=Refusal)`` for the rule routes."""

    def __init__(
        self,
        store: RegistryStore,
        sync: RegistrySync,
        *,
        audit_log: AuditLog | None,
        refusal: Callable[..., Exception],
    ) -> None:
        self.store = store
        self.sync = sync
        self.audit_log = audit_log
        self._refusal = refusal

    @property
    def shared(self) -> bool:
        """Whether a change reaches every process (else the routes keep today's rule)."""
        return self.store.shared

    async def get(self, name: RuleName) -> RuleDocument | None:
        return await self.store.get_rules(name)

    async def write(
        self,
        request: Request,
        caller: Caller,
        name: RuleName,
        document: bytes,
        action: AuditAction,
        *,
        expect: int | None = None,
    ) -> int:
        """Store ``document`` as the rules ``name``; with ``expect`` only over that version
        (409 ``conflict`` when another change came first: read again and retry)."""
        return await self._put(request, caller, name, document, action, expect)

    async def remove(
        self, request: Request, caller: Caller, name: RuleName, action: AuditAction
    ) -> int:
        """Drop the rules ``name`` (the file's apply again); 404 when none are stored."""
        return await self._put(request, caller, name, None, action, None)

    async def _put(
        self,
        request: Request,
        caller: Caller,
        name: RuleName,
        document: bytes | None,
        action: AuditAction,
        expect: int | None,
    ) -> int:
        held = await self.store.get_rules(name)
        before = held.version if held is not None else 0
        client = request.client
        audit = AuditEntry(
            at=time.time(),
            actor=f"{caller.role}:{caller.id}",
            role=caller.role,
            action=action,
            tenant="",
            before_version=before,
            request_id=getattr(request.state, "request_id", None),
            address=client.host if client else None,
        )
        try:
            version = await self.store.put_rules(name, document, expect=expect, audit=audit)
        except VersionMismatch as exc:
            if document is None and exc.current == 0:
                raise self._refusal(
                    404, f"No {name} rules are stored: the file's apply.", "rules_not_found"
                ) from None
            raise self._refusal(409, "The rules changed meanwhile; retry.", "conflict") from None
        # In force here before the answer leaves (the others follow by pub/sub).
        await self.sync.refresh()
        await self._record(audit, version, held, document)
        return version

    async def _record(
        self, audit: AuditEntry, version: int, held: RuleDocument | None, document: bytes | None
    ) -> None:
        if self.audit_log is None:
            return
        entry = msgspec.structs.replace(
            audit,
            id=f"aud_{secrets.token_hex(12)}",
            version=version,
            before=_plain(held.document if held is not None else None),
            after=_plain(document),
        )
        try:
            await self.audit_log.write_audit(entry)
        except Exception:
            log.exception("audit entry not stored in the ledger", **msgspec.to_builtins(entry))


def _plain(document: bytes | None) -> dict[str, object] | None:
    """A rules document as the trail's ``before``/``after`` (an object: a list is wrapped)."""
    if document is None:
        return None
    value = msgspec.json.decode(document)
    return value if isinstance(value, dict) else {"rules": value}
