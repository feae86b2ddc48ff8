"""Per-window counters fed by the usage records, off the request path.

The ledger writer hands every flushed batch to its observers; this one adds each record to
``[judged, bad]`` of each record-based rule, per group and time bucket. Every evaluation
tick the counts gathered since the last one are taken and added to the shared store, so the
windows sum the counts of every replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from tenantware.alerts.rules import WindowRule
from tenantware.metering.ledger.record import UsageRecord

__all__ = ["BucketKey", "Counts", "WindowCounters"]

#: ``(rule id, group, bucket index)``.
BucketKey = tuple[str, str, int]
Counts = dict[BucketKey, list[int]]


class WindowCounters:
    """Counts gathered in this process since the last ``take``."""

    __slots__ = ("_counts", "bucket_s", "max_keys")

    def __init__(self, bucket_s: float, *, max_keys: int = 100_000) -> None:
        self.bucket_s = bucket_s
        #: Bound on the keys kept while the store cannot take them (oldest dropped first).
        self.max_keys = max_keys
        self._counts: Counts = {}

    def observe(self, records: Sequence[UsageRecord], rules: Sequence[WindowRule]) -> None:
        counts = self._counts
        bucket_s = self.bucket_s
        for record in records:
            bucket = int(record.ts // bucket_s)
            for rule in rules:
                judged = rule.judge(record)
                if judged is None:
                    continue
                key = (rule.rule.id, judged[0], bucket)
                entry = counts.get(key)
                if entry is None:
                    entry = counts[key] = [0, 0]
                entry[0] += 1
                if judged[1]:
                    entry[1] += 1

    def take(self) -> Counts:
        """The counts since the last call (this process's share, to add to the store)."""
        taken, self._counts = self._counts, {}
        return taken

    def give_back(self, counts: Counts, oldest_bucket: int) -> None:
        """Counts the store could not take, kept for the next tick (those of buckets older
        than ``oldest_bucket`` are past every window and dropped)."""
        for key, (judged, bad) in counts.items():
            if key[2] < oldest_bucket:
                continue
            entry = self._counts.setdefault(key, [0, 0])
            entry[0] += judged
            entry[1] += bad
        if len(self._counts) > self.max_keys:
            excess = len(self._counts) - self.max_keys
            for key in sorted(self._counts, key=lambda k: k[2])[:excess]:
                del self._counts[key]
