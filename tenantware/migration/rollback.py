"""Automatic rollback: a candidate judged against the primary over a sliding window.

Each target of a rule (the primary, each candidate) has a window as long as the breaker's
deployment window (``breaker.deployment.window_s``, ten buckets, like its circuits): calls,
errors and latencies. Once both sides hold ``rollback_minimum_calls``, a candidate whose error
rate exceeds the primary's by ``rollback_error_margin_percent`` points, or whose p99 exceeds
the primary's by ``rollback_p99_margin_percent`` %, is rolled back: no more canary or shadow
traffic until its settings change (a reload or an admin API call re-arms it). Windows are
kept per process: each replica judges what it sent. With Redis a rollback judged by one
process is shared (``adopt``): a candidate that fails on any replica is rolled back on all.
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
#: Calls between two p99 computations of one window.
_P99_EVERY = 64


class Window:
    """Calls, errors and latencies over the last ``window_s``, in ``BUCKETS`` buckets.

    The counts are summed on every judgement (ten buckets); the p99 sorts up to
    ``BUCKETS * _LATENCIES_PER_BUCKET`` latencies, so it is recomputed only every
    ``_P99_EVERY`` calls or when the window moves on a bucket.
    """

    __slots__ = ("_buckets", "_clock", "_p99", "bucket_s")

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket_s = window_s / BUCKETS
        self._clock = clock
        #: slot -> (bucket number, calls, errors, latencies)
        self._buckets: list[tuple[int, int, int, list[float]]] = [
            (-1, 0, 0, []) for _ in range(BUCKETS)
        ]
        #: (bucket number, calls counted, p99) of the last p99 computed.
        self._p99 = (-1, 0, 0.0)

    def _now(self) -> int:
        return int(self._clock() / self.bucket_s)

    def add(self, ok: bool, latency_s: float) -> None:
        number = self._now()
        slot = number % BUCKETS
        held, calls, errors, latencies = self._buckets[slot]
        if held != number:
            calls, errors, latencies = 0, 0, []
        if len(latencies) < _LATENCIES_PER_BUCKET:
            latencies.append(latency_s)
        self._buckets[slot] = (number, calls + 1, errors + (not ok), latencies)

    def counts(self) -> tuple[int, int]:
        """(calls, errors) of the buckets still in the window."""
        now = self._now()
        calls = errors = 0
        for number, c, e, _values in self._buckets:
            if now - BUCKETS < number <= now:
                calls += c
                errors += e
        return calls, errors

    def p99(self) -> float:
        """The p99 latency of the window (0 when empty), recomputed now and then."""
        now = self._now()
        calls, _errors = self.counts()
        held, counted, value = self._p99
        if held == now and calls - counted < _P99_EVERY:
            return value
        latencies = sorted(
            x
            for number, _c, _e, values in self._buckets
            if now - BUCKETS < number <= now
            for x in values
        )
        value = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)] if latencies else 0.0
        self._p99 = (now, calls, value)
        return value


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

    def adopt(self, key: str, candidate: MigrationCandidate) -> bool:
        """Take up a rollback another process judged; ``True`` if it is news here."""
        if self._rolled.get(key) == candidate:
            return False
        self._rolled[key] = candidate
        log.warning("migration candidate rolled back by another process", trial=key)
        return True

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
        window = self._window(trial.key, window_s)
        calls, errors = window.counts()
        base_calls, base_errors = primary.counts()
        if min(calls, base_calls) < rule.rollback_minimum_calls:
            return None
        margin = rule.rollback_error_margin_percent
        rate, base_rate = errors * 100 / calls, base_errors * 100 / base_calls
        if margin is not None and rate > base_rate + margin:
            return f"error rate {rate:.1f} % against the primary's {base_rate:.1f} %"
        p99_margin = rule.rollback_p99_margin_percent
        if p99_margin is None:
            return None
        p99, base_p99 = window.p99(), primary.p99()
        if p99 > base_p99 * (1 + p99_margin / 100):
            return f"p99 {p99 * 1000:.0f} ms against the primary's {base_p99 * 1000:.0f} ms"
        return None
