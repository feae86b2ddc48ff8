"""The shared comparison report and rollbacks in Redis: one report for every replica.

Keys (under ``gateway.redis_prefix``):

- ``tw:migration:report:{rule}\\x1f{trial}:{hour}``: hash of the trial's counters over that
  hour (``migration.tally``), added to with HINCRBY by every process; expires after
  ``REPORT_KEPT_S``;
- ``tw:migration:trials``: hash, ``rule\\x1ftrial`` -> the first hour counted (which hours a
  report reads);
- ``tw:migration:rolled``: hash, trial key -> the candidate settings (JSON) it was rolled
  back under: a rollback judged by any process holds on every one.

Written in batches off the request path (``MigrationRunner``'s flush task), read by the
report route and the flush task. redis-py errors become ``StoreUnavailable``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import Final

import msgspec

from tenantware.backends.redis_support import RedisClient, redis_errors
from tenantware.config import MigrationCandidate
from tenantware.migration.tally import HOUR_S, TallyKey

__all__ = ["REPORT_KEPT_S", "RedisReportStore"]

#: How long an hour of counters is kept (a shared report reaches back this far).
REPORT_KEPT_S: Final = 31 * 86_400
_SEP: Final = "\x1f"
_candidate = msgspec.json.Decoder(MigrationCandidate)


class RedisReportStore:
    """``RedisReportStore(redis, prefix="app1:")``: the fleet's report counters."""

    def __init__(self, redis: RedisClient, *, prefix: str = "") -> None:
        self.redis = redis
        base = f"{prefix}tw:migration:"
        self._report = base + "report:"
        self._trials = base + "trials"
        self._rolled = base + "rolled"

    def _key(self, rule: str, trial: str, hour: int) -> str:
        return f"{self._report}{rule}{_SEP}{trial}:{hour}"

    async def add(self, batch: Mapping[TallyKey, Counter[str]]) -> None:
        """Add a process's counters (one pipeline for the batch)."""
        if not batch:
            return
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for (rule, trial, hour), fields in batch.items():
                    key = self._key(rule, trial, hour)
                    for field, value in fields.items():
                        if value:
                            pipe.hincrby(key, field, value)
                    pipe.expire(key, REPORT_KEPT_S)
                    pipe.hsetnx(self._trials, f"{rule}{_SEP}{trial}", hour)
                await pipe.execute()

    async def read(
        self, *, since: float, until: float, rule: str | None
    ) -> dict[tuple[str, str], Counter[str]]:
        """Counters per (rule, trial) summed over the hours that overlap [since, until)."""
        with redis_errors():
            trials = await self.redis.hgetall(self._trials)
        now_hour = int(time.time() // HOUR_S)
        last = min(now_hour, int(until // HOUR_S)) if until != float("inf") else now_hour
        oldest = now_hour - REPORT_KEPT_S // HOUR_S
        wanted: list[tuple[str, str, int]] = []
        for raw, raw_first in trials.items():
            name, _, trial = _text(raw).partition(_SEP)
            if rule is not None and name != rule:
                continue
            first = max(int(raw_first), int(since // HOUR_S), oldest)
            wanted += [(name, trial, hour) for hour in range(first, last + 1)]
        totals: dict[tuple[str, str], Counter[str]] = {}
        if not wanted:
            return totals
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, trial, hour in wanted:
                    pipe.hgetall(self._key(name, trial, hour))
                replies = await pipe.execute()
        for (name, trial, _hour), reply in zip(wanted, replies, strict=True):
            total = totals.setdefault((name, trial), Counter())
            for field, value in reply.items():
                total[_text(field)] += int(value)
        return totals

    async def roll_back(self, trial: str, candidate: MigrationCandidate) -> None:
        """Say on every process that ``trial`` is rolled back under these settings."""
        with redis_errors():
            await self.redis.hset(self._rolled, trial, msgspec.json.encode(candidate))

    async def rolled(self) -> dict[str, MigrationCandidate]:
        """Every rollback any process judged: trial key -> the settings it holds under."""
        with redis_errors():
            raw = await self.redis.hgetall(self._rolled)
        found: dict[str, MigrationCandidate] = {}
        for key, value in raw.items():
            try:
                found[_text(key)] = _candidate.decode(value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue  # written by a newer version: not this one's to judge
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
