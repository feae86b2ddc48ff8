"""Alert state in this process (no Redis): the lease is always this process's."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from tenantware.alerts.model import Alert, AlertEvent, TenantWebhook
from tenantware.alerts.window import Counts

__all__ = ["MemoryAlertStore", "earliest"]


class MemoryAlertStore:
    shared = False

    def __init__(self) -> None:
        self._counts: Counts = {}
        self._facts: dict[str, tuple[float, dict[str, float]]] = {}
        self._active: dict[str, Alert] = {}
        self._history: deque[AlertEvent] = deque()
        self._webhooks: dict[str, TenantWebhook] = {}

    async def add_counts(self, counts: Counts, *, oldest_bucket: int, ttl_s: float) -> None:
        for key, (judged, bad) in counts.items():
            entry = self._counts.setdefault(key, [0, 0])
            entry[0] += judged
            entry[1] += bad
        for key in [k for k in self._counts if k[2] < oldest_bucket]:
            del self._counts[key]

    async def read_counts(self, first_bucket: int, last_bucket: int) -> Counts:
        return {
            key: list(value)
            for key, value in self._counts.items()
            if first_bucket <= key[2] <= last_bucket
        }

    async def report_facts(self, replica: str, facts: Mapping[str, float], now: float) -> None:
        self._facts[replica] = (now, dict(facts))

    async def facts(self, now: float, max_age_s: float) -> dict[str, float]:
        return earliest(found for at, found in self._facts.values() if now - at <= max_age_s)

    async def acquire(self, holder: str, ttl_s: float) -> bool:
        return True

    async def release(self, holder: str) -> None:
        return None

    async def active(self) -> dict[str, Alert]:
        return dict(self._active)

    async def set_active(self, alert: Alert) -> None:
        self._active[alert.fingerprint] = alert

    async def clear_active(self, fingerprint: str) -> None:
        self._active.pop(fingerprint, None)

    async def record(self, event: AlertEvent, keep: int) -> None:
        self._history.appendleft(event)
        while len(self._history) > keep:
            self._history.pop()

    async def history(self, limit: int) -> list[AlertEvent]:
        return list(self._history)[:limit]

    async def webhooks(self) -> list[TenantWebhook]:
        return list(self._webhooks.values())

    async def put_webhook(self, webhook: TenantWebhook) -> None:
        self._webhooks[webhook.id] = webhook

    async def delete_webhook(self, webhook_id: str) -> bool:
        return self._webhooks.pop(webhook_id, None) is not None


def earliest(reports: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each fact with the earliest start any replica reports for it."""
    merged: dict[str, float] = {}
    for facts in reports:
        for name, since in facts.items():
            merged[name] = min(since, merged.get(name, since))
    return merged
