"""Rules changed at run time through the admin API, kept in the registry beside the tenants.

The ``[migration]`` settings and the alert rules (``alerts.rules``) can be replaced through the
admin API. With a shared registry each is one JSON document in it, written with a registry
version like a tenant, so every replica learns of it the way it learns of tenants and lays it
over its file's settings (``RuntimeRules.over``). Like the tenants, a document in the registry
wins over the file's rules, also after a reload of the file, until it is removed (then the
file's rules apply again on every replica).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, get_args

import msgspec

from tenantware.config import AlertRule, GatewayConfig, MigrationSettings

__all__ = [
    "ALERT_RULES",
    "MIGRATION_RULES",
    "RuleDocument",
    "RuleName",
    "RuntimeRules",
    "decode_rules",
    "encode_rules",
]

RuleName = Literal["migration", "alerts"]
#: The ``[migration]`` settings, whole.
MIGRATION_RULES: Final[RuleName] = "migration"
#: ``alerts.rules``, the list.
ALERT_RULES: Final[RuleName] = "alerts"
RULE_NAMES: Final = frozenset(get_args(RuleName))

_decode_migration = msgspec.json.Decoder(MigrationSettings).decode
_decode_alerts = msgspec.json.Decoder(list[AlertRule]).decode


class RuleDocument(msgspec.Struct, frozen=True, kw_only=True):
    """One rules document as stored, with the registry version of its last change."""

    version: int
    document: bytes


class RuntimeRules(msgspec.Struct, frozen=True, kw_only=True):
    """The rules the registry holds (``None``: the file's apply)."""

    migration: MigrationSettings | None = None
    alerts: list[AlertRule] | None = None

    def __bool__(self) -> bool:
        return self.migration is not None or self.alerts is not None

    def over(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with these rules in place of its own (checked like the file's:
        ``msgspec.ValidationError`` names what they refer to that ``config`` lacks)."""
        if not self:
            return config
        changes: dict[str, object] = {}
        if self.migration is not None:
            changes["migration"] = self.migration
        if self.alerts is not None:
            changes["alerts"] = msgspec.structs.replace(config.alerts, rules=list(self.alerts))
        return msgspec.structs.replace(config, **changes)


def encode_rules(rules: RuntimeRules) -> dict[str, bytes]:
    """The documents of ``rules`` by name (what a registry that lost its data is seeded with)."""
    documents: dict[str, bytes] = {}
    if rules.migration is not None:
        documents[MIGRATION_RULES] = msgspec.json.encode(rules.migration)
    if rules.alerts is not None:
        documents[ALERT_RULES] = msgspec.json.encode(rules.alerts)
    return documents


def decode_rules(documents: Mapping[str, RuleDocument]) -> RuntimeRules:
    """The stored documents as rules (an unknown name is ignored: a newer replica's)."""
    migration = documents.get(MIGRATION_RULES)
    alerts = documents.get(ALERT_RULES)
    return RuntimeRules(
        migration=_decode_migration(migration.document) if migration else None,
        alerts=_decode_alerts(alerts.document) if alerts else None,
    )
