"""The alert engine's cost per usage record, next to the Prometheus observer's.

Run: ``pytest benchmarks/test_bench_alerts.py -p no:cacheprovider --benchmark-enable``.
Both run in the ledger writer, once per flushed batch, after the response was sent: this is
gateway CPU per request, never latency. Each round hands one batch of ``BATCH`` records to the
observer; the figure per record is the round's time / ``BATCH``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchconfig import ALERTS_EVERY_RULE

from tenantware.alerts import AlertEngine, MemoryAlertStore
from tenantware.config import parse_config
from tenantware.metering.ledger import UsageRecord
from tenantware.metering.telemetry import metrics_observer
from tenantware.state import LiveConfig

BATCH = 1000


def _live() -> LiveConfig:
    return LiveConfig(
        parse_config(
            {
                "tenants": [{"id": f"t{i}", "tier": "pro"} for i in range(10)],
                "alerts": ALERTS_EVERY_RULE,
                "metering": {"ledger_url": "memory://", "request_log": False},
            }
        )
    )


def _batch() -> list[UsageRecord]:
    return [
        UsageRecord(
            record_id=str(i),
            request_id=str(i),
            ts=1_700_000_000.0 + i / 100,
            tenant=f"t{i % 10}",
            model_requested="gpt-4.1",
            model_served="gpt-4.1",
            upstream="fake",
            status=200,
            outcome="ok",
            input_tokens=30,
            output_tokens=64,
            cost_nanousd=572_000,
            latency_s=0.01,
            upstream_latency_s=0.009,
            ttft_s=0.005 if i % 2 else None,
            stream=bool(i % 2),
        )
        for i in range(BATCH)
    ]


@pytest.mark.parametrize("observer", ["alerts", "metrics"])
def test_bench_observer_per_record(benchmark: Any, observer: str) -> None:
    live = _live()
    batch = _batch()
    if observer == "alerts":
        observe = AlertEngine(live, MemoryAlertStore()).observe
    else:
        observe = metrics_observer(live)
    benchmark.extra_info["records_per_round"] = BATCH
    benchmark.pedantic(observe, args=(batch,), rounds=30, warmup_rounds=2)
