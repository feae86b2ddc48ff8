"""Automatic rollback: a candidate judged against the primary over a sliding window.

Each target of a rule (the primary, each candidate) has a window as long as the breaker's
deployment window (``breaker.deployment.window_s``, ten buckets, like its circuits): calls,
errors and latencies. Once both sides hold ``rollback_minimum_calls``, a candidate whose error
rate exceeds the primary's by ``rollback_error_margin_percent`` points, or whose p99 exceeds
the primary's by ``rollback_p99_margin_percent`` %, is rolled back: no more canary or shadow
traffic until its settings change (a reload or an admin API call re-arms it). Windows are
kept per process: each replica judges what it sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import structlog

from tenantware.config import MigrationCandidate, MigrationRule
from tenantware.migration.rules import Trial

__all__ = ["BUCKETS", "Rollbacks", "Window"]

log = structlog.get_logger("tenantware.migration")

BUCKETS = 10
#: Latencies kept per bucket for the p99 (the first ones; enough for a rate comparison).
_LATENCIES_PER_BUCKET = 2_000


class Window:
    """Calls, errors and latencies over the last ``window_s``, in ``BUCKETS`` buckets."""

    __slots__ = ("_buckets", "_clock", "bucket_s")

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket_s = window_s / BUCKETS
        self._clock = clock
        #: slot -> (bucket number, calls, errors, latencies)
        self._buckets: list[tuple[int, int, int, list[float]]] = [
            (-1, 0, 0, []) for _ in range(BUCKETS)
        ]

    def add(self, ok: bool, latency_s: float) -> None:
        number = int(self._clock() / self.bucket_s)
        slot = number % BUCKETS
        held, calls, errors, latencies = self._buckets[slot]
        if held != number:
            calls, errors, latencies = 0, 0, []
        if len(latencies) < _LATENCIES_PER_BUCKET:
            latencies.append(latency_s)
        self._buckets[slot] = (number, calls + 1, errors + (not ok), latencies)

    def totals(self) -> tuple[int, int, list[float]]:
        """(calls, errors, sorted latencies) of the buckets still in the window."""
        now = int(self._clock() / self.bucket_s)
        calls = errors = 0
        latencies: list[float] = []
        for number, c, e, values in self._buckets:
            if now - BUCKETS < number <= now:
                calls += c
                errors += e
                latencies.extend(values)
        latencies.sort()
        return calls, errors, latencies


def _p99(values: list[float]) -> float:
    return values[max(0, math.ceil(0.99 * len(values)) - 1)] if values else 0.0


class Rollbacks:
    """Windows of every target and the candidates rolled back, for one gateway process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, Window] = {}
        #: trial key -> the candidate settings it was rolled back under.
        self._rolled: dict[str, MigrationCandidate] = {}
        #: Rollbacks so far (also the ``tenantware_migration_rollbacks`` counter).
        self.count = 0

    def rolled_back(self, trial: Trial) -> bool:
        """Whether this trial is rolled back (under its current settings)."""
        held = self._rolled.get(trial.key)
        return held is not None and held == trial.candidate

    def _window(self, key: str, window_s: float) -> Window:
        window = self._windows.get(key)
        if window is None or window.bucket_s != window_s / BUCKETS:
            window = self._windows[key] = Window(window_s, self._clock)
        return window

    def record_primary(
        self, rule: MigrationRule, ok: bool, latency_s: float, window_s: float
    ) -> None:
        self._window(f"{rule.name}/primary", window_s).add(ok, latency_s)

    def record_candidate(
        self, trial: Trial, ok: bool, latency_s: float, window_s: float
    ) -> str | None:
        """Count a candidate's call; the reason when this rolls it back now."""
        self._window(trial.key, window_s).add(ok, latency_s)
        if self.rolled_back(trial):
            return None
        reason = self._judge(trial, window_s)
        if reason is not None:
            self._rolled[trial.key] = trial.candidate
            self.count += 1
            log.warning("migration candidate rolled back", trial=trial.key, reason=reason)
        return reason

    def _judge(self, trial: Trial, window_s: float) -> str | None:
        rule = trial.rule
        primary = self._windows.get(f"{rule.name}/primary")
        if primary is None:
            return None
        calls, errors, latencies = self._window(trial.key, window_s).totals()
        base_calls, base_errors, base_latencies = primary.totals()
        if min(calls, base_calls) < rule.rollback_minimum_calls:
            return None
        margin = rule.rollback_error_margin_percent
        rate, base_rate = errors * 100 / calls, base_errors * 100 / base_calls
        if margin is not None and rate > base_rate + margin:
            return f"error rate {rate:.1f} % against the primary's {base_rate:.1f} %"
        p99_margin = rule.rollback_p99_margin_percent
        p99, base_p99 = _p99(latencies), _p99(base_latencies)
        if p99_margin is not None and p99 > base_p99 * (1 + p99_margin / 100):
            return f"p99 {p99 * 1000:.0f} ms against the primary's {base_p99 * 1000:.0f} ms"
        return None
