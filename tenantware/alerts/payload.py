"""The webhook body: a versioned JSON schema, or a Slack incoming-webhook message.

Schema version 1 (fields are only ever added)::

    {"version": 1, "id": "<event id, the same on every retry>", "status": "firing" | "resolved",
     "alert": {"fingerprint", "rule", "kind", "severity", "scope", "group", "tenant",
               "summary", "value", "threshold", "started_at", "resolved_at"}}
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tenantware.alerts.model import Alert

__all__ = ["PAYLOAD_VERSION", "AlertBody", "Message", "Payload", "render"]

PAYLOAD_VERSION = 1
Status = Literal["firing", "resolved"]


class AlertBody(msgspec.Struct, frozen=True, kw_only=True):
    fingerprint: str
    rule: str
    kind: str
    severity: str
    scope: str
    group: str
    tenant: str | None
    summary: str
    value: float
    threshold: float
    started_at: float
    resolved_at: float | None


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    id: str
    status: Status
    alert: AlertBody


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One notification to deliver: an alert fired or resolved."""

    id: str
    status: Status
    alert: Alert
    resolved_at: float | None = None


def _payload(message: Message) -> Payload:
    a = message.alert
    return Payload(
        version=PAYLOAD_VERSION,
        id=message.id,
        status=message.status,
        alert=AlertBody(
            fingerprint=a.fingerprint,
            rule=a.rule,
            kind=a.kind,
            severity=a.severity,
            scope=a.scope,
            group=a.group,
            tenant=a.tenant,
            summary=a.summary,
            value=a.value,
            threshold=a.threshold,
            started_at=a.started_at,
            resolved_at=message.resolved_at,
        ),
    )


def _slack_text(message: Message) -> str:
    a = message.alert
    head = "RESOLVED" if message.status == "resolved" else f"FIRING ({a.severity})"
    about = f"{a.scope} `{a.group}`" if a.group else "gateway"
    return f"*[{head}] {a.rule}* on {about}: {a.summary} (value {a.value:.4g})"


def render(message: Message, fmt: str) -> bytes:
    """The request body for a destination of format ``fmt`` (``json`` or ``slack``)."""
    if fmt == "slack":
        return msgspec.json.encode({"text": _slack_text(message)})
    return msgspec.json.encode(_payload(message))
