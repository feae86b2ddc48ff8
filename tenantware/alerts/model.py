"""What an alert is, what its history records, and what one evaluation finds.

``Alert`` and ``AlertEvent`` are stored (Redis or memory) and shown by the admin API; the
webhook payload (``payload.py``) is built from an ``Alert``. Field names are part of the
stable schema: add fields, never rename them.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["Alert", "AlertEvent", "EventKind", "Finding", "TenantWebhook"]

EventKind = Literal["fired", "resolved", "delivered", "failed", "dropped"]


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One firing condition: a rule, for one group (a tenant, an upstream circuit...)."""

    #: ``<rule>:<group>``: the same while the condition holds (deduplication key).
    fingerprint: str
    rule: str
    kind: str
    severity: str
    scope: str
    #: The tenant, tier, model, upstream or circuit the alert is about (empty: global).
    group: str
    #: The tenant it concerns, when it concerns one (its own webhooks receive it).
    tenant: str | None
    summary: str
    #: The measured value and the rule's threshold, in the rule's unit.
    value: float
    threshold: float
    #: Unix time the condition was first seen.
    started_at: float


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the alert history, newest first in listings."""

    id: str
    ts: float
    event: EventKind
    fingerprint: str
    rule: str
    tenant: str | None = None
    #: ``firing`` or ``resolved``: which message a delivery entry is about.
    status: str = "firing"
    value: float = 0.0
    destination: str | None = None
    attempts: int = 0
    detail: str = ""


class Finding(msgspec.Struct, frozen=True):
    """What one rule says about one group right now."""

    group: str
    tenant: str | None
    value: float
    firing: bool


class TenantWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook a tenant registered through the admin API: its alerts only, signed with
    ``secret`` (shown once, when it is registered)."""

    id: str
    tenant: str
    url: str
    format: Literal["json", "slack"] = "json"
    min_severity: Literal["info", "warning", "critical"] = "info"
    secret: str
    created_at: float
