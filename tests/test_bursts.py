"""Exact limits under bursts on a loaded host: a busy Redis is not a dead Redis (issue 13).

Four gateway OS processes (``tests/burst_worker.py``) share one private Redis while CPU hog
processes keep both cores busy; every process sends its share of the burst at the same
instant. One burst carries three tenants at once (4,000 requests): a request rate, a
concurrency and a token limit, each checked by its own test.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.burst_worker import REPORTS, Job, Load, Report, cpu_hogs, workers
from tests.servers import (
    RedisServer,
    ServiceUnavailable,
    throwaway_redis,
)

pytestmark = pytest.mark.slow
PROCESSES = 4
RATE = Load(limits={"requests_per_minute": 100, "burst_multiplier": 1.0}, requests=2000)
#: Held long enough that the first ten overlap however late a starved process starts.
CONCURRENCY = Load(limits={"concurrent_requests": 10}, requests=1000, hold_s=3.0)
TOKEN_LIMIT = 20_000
TOKENS = Load(limits={"tokens_per_day": TOKEN_LIMIT}, requests=1000)
#: The counters of the layers whose store decisions the outage test follows.
WATCHED = ("quota:local", "admission:local")


def burst(url: str, loads: dict[str, Load], gateway: dict[str, Any] | None = None) -> list[Report]:
    """Every tenant's requests at once, split over the processes, on a loaded host."""
    prefix = f"twburst:{uuid.uuid4().hex[:8]}:"
    share = {
        name: Load(limits=load.limits, requests=load.requests // PROCESSES, hold_s=load.hold_s)
        for name, load in loads.items()
    }
    jobs = [
        Job(redis_url=url, prefix=prefix, tenants=share, gateway=gateway or {})
        for _ in range(PROCESSES)
    ]
    with workers(jobs) as go, cpu_hogs(25):
        time.sleep(0.5)  # the hogs have the cores
        go()
    return list(REPORTS)


@pytest.fixture(scope="module")
def reports() -> Iterator[list[Report]]:
    # A private Redis: other suites' traffic would be noise here.
    try:
        with throwaway_redis() as server:
            yield burst(server.url, {"rate": RATE, "conc": CONCURRENCY, "tokens": TOKENS})
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway Redis: {exc.reason}")


def statuses(reports: list[Report], tenant: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for report in reports:
        for name, _, _, status in report.calls:
            if name == tenant:
                out[status] = out.get(status, 0) + 1
    return out


def no_degraded_decision(reports: list[Report]) -> None:
    """Redis was healthy: not one limit was decided without it."""
    for report in reports:
        counts = report.failures[-1][1]
        limits = {key: n for key, n in counts.items() if not key.startswith("breaker:")}
        assert sum(limits.values()) == 0, "\n".join(report.logs)


def check_rate(reports: list[Report], tenant: str) -> None:
    answered = statuses(reports, tenant)
    calls = [call for report in reports for call in report.calls if call[0] == tenant]
    # GCRA refills one request per 0.6 s while the burst lasts: exact means 100 plus those.
    refills = math.floor((max(call[2] for call in calls) - min(call[1] for call in calls)) / 0.6)
    assert answered.keys() <= {200, 429}, answered
    no_degraded_decision(reports)
    assert 100 <= answered[200] <= 100 + refills, (answered, refills)


def test_a_rate_limit_is_exact_under_a_burst_from_four_processes(
    reports: list[Report],
) -> None:
    check_rate(reports, "rate")


def test_a_concurrency_limit_is_exact_under_a_burst(reports: list[Report]) -> None:
    edges = sorted(
        (t, step)
        for report in reports
        for name, start, end, _ in report.inner
        if name == "conc"
        for t, step in ((start, 1), (end, -1))
    )
    held = most = 0
    for _, step in edges:
        held += step
        most = max(most, held)
    assert statuses(reports, "conc").keys() <= {200, 429}
    assert most == 10
    no_degraded_decision(reports)


def test_a_token_limit_is_never_overshot_under_a_burst(reports: list[Report]) -> None:
    used = [tokens for report in reports for name, _, _, tokens in report.inner if name == "tokens"]
    assert statuses(reports, "tokens").keys() <= {200, 429}
    assert TOKEN_LIMIT - max(used) < sum(used) <= TOKEN_LIMIT  # filled, never overshot
    no_degraded_decision(reports)


def test_a_rate_limit_is_exact_on_a_redis_cluster(cluster_urls: list[str]) -> None:
    url = "redis+cluster://" + cluster_urls[0].split("://", 1)[1]
    # A cluster client's evidence is every reply it reads (docs/quotas.md: "Redis Cluster"),
    # but on a host this starved a 0.25 s silence of three CPU-starved nodes is no outage,
    # so the bound is the one docs/quotas.md advises for a cluster.
    check_rate(burst(url, {"rate": RATE}, gateway={"redis_timeout_s": 1.0}), "rate")


def test_a_stopped_redis_is_answered_within_the_bound_and_exact_after() -> None:
    # Redis is frozen (SIGSTOP) for 3 s while four processes keep traffic going: every answer
    # comes within the bound (plus a loaded host's slack), the policies in force (local: this
    # process's share) are applied and counted, and within a probe interval after SIGCONT
    # every decision is the store's again.
    bound, probe = 0.5, 0.25
    try:
        server_cm = throwaway_redis()
        server: RedisServer = server_cm.__enter__()
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway Redis: {exc.reason}")
    steady = Load(
        limits={"requests_per_minute": 1_000_000, "concurrent_requests": 1000},
        loops=20,
        hold_s=0.02,
    )
    jobs = [
        Job(
            redis_url=server.url,
            prefix=f"twstop:{uuid.uuid4().hex[:8]}:",
            tenants={"steady": steady},
            mode="steady",
            duration_s=6.0,
            admission={"seats": 200},
            gateway={
                "redis_timeout_s": bound,
                "store_probe_interval_s": probe,
                "replicas": PROCESSES,
            },
        )
        for _ in range(PROCESSES)
    ]
    try:
        with workers(jobs) as go, cpu_hogs(25):
            start_at = go()
            time.sleep(max(0.0, start_at + 1.5 - time.time()))
            stopped_at = time.time()
            server.pause()
            time.sleep(3.0)
            server.resume()
            resumed_at = time.time()
        reports = list(REPORTS)
    finally:
        server.resume()
        server_cm.__exit__(None, None, None)

    calls = [call for report in reports for call in report.calls]
    assert statuses(reports, "steady").keys() == {200}
    # Answered while Redis was still stopped: by the policy after the bound, not by Redis
    # after SIGCONT (the bound, not the stop, limits the wait; on a host this loaded the
    # margin is generous, the test does not time the bound itself).
    during = [call for call in calls if stopped_at <= call[1] <= resumed_at - 1.5]
    assert during, "no traffic while Redis was stopped"
    late = [(sent - stopped_at, done - sent) for _, sent, done, _ in during if done >= resumed_at]
    assert not late, late
    for report in reports:
        # The local policy answered (and was counted) in every process...
        final = report.failures[-1][1]
        assert final.get("quota:local", 0) > 0, final
        assert final.get("admission:local", 0) > 0, final
        # ...and stopped doing so within a probe interval (plus a probe's bound) of SIGCONT.
        last_change = max(
            (
                t
                for (t, now), (_, before) in zip(
                    report.failures[1:], report.failures[:-1], strict=True
                )
                if any(now.get(k) != before.get(k) for k in WATCHED)
            ),
            default=0.0,
        )
        assert last_change < resumed_at + probe + bound + 0.5, last_change - resumed_at
