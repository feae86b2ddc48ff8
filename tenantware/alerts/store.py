"""Where alert state lives: window counts, replica facts, the evaluation lease, the alerts
firing now and the history. ``MemoryAlertStore`` for one process, ``RedisAlertStore`` for
replicas sharing a Redis (one evaluates at a time; counts and facts of all are summed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from tenantware.alerts.model import Alert, AlertEvent, TenantWebhook
from tenantware.alerts.window import Counts

__all__ = ["AlertStore"]


class AlertStore(Protocol):
    #: Other processes share this state (so a lease decides who evaluates).
    shared: bool

    async def add_counts(self, counts: Counts, *, oldest_bucket: int, ttl_s: float) -> None:
        """Add this process's counts to the buckets; buckets before ``oldest_bucket`` are
        past every window (a bucket is kept ``ttl_s``)."""
        ...

    async def read_counts(self, first_bucket: int, last_bucket: int) -> Counts:
        """Every replica's counts of the buckets ``first_bucket..last_bucket``."""
        ...

    async def report_facts(self, replica: str, facts: Mapping[str, float], now: float) -> None:
        """This replica's states and since when (``{"circuit:fake/gpt-4.1": 1700000000.0}``)."""
        ...

    async def facts(self, now: float, max_age_s: float) -> dict[str, float]:
        """Every fresh replica's facts, each with its earliest start."""
        ...

    async def acquire(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the evaluation lease; ``False`` while another replica holds it."""
        ...

    async def release(self, holder: str) -> None: ...

    async def active(self) -> dict[str, Alert]:
        """The alerts firing now, by fingerprint."""
        ...

    async def set_active(self, alert: Alert) -> None: ...

    async def clear_active(self, fingerprint: str) -> None: ...

    async def record(self, event: AlertEvent, keep: int) -> None:
        """Append to the history, keeping the newest ``keep`` entries."""
        ...

    async def history(self, limit: int) -> list[AlertEvent]:
        """The newest ``limit`` entries, newest first."""
        ...

    async def webhooks(self) -> list[TenantWebhook]:
        """Every webhook tenants registered."""
        ...

    async def put_webhook(self, webhook: TenantWebhook) -> None: ...

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Remove it; ``False`` when there was none."""
        ...
