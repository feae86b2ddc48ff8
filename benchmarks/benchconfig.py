"""The gateway configuration every benchmark runs with, built as a plain dict.

Layers that land later add their knobs in :func:`layer_settings` (one place), so the load
benchmark and the micro-benchmarks measure the whole stack as ``Gateway`` builds it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from tenantware import KeyHasher

#: The API key every benchmark request sends (tenant ``bench``).
BENCH_KEY = "sk-bench-0123456789abcdef"
MODEL = "gpt-4.1"
CHAT_BODY = (
    b'{"model":"gpt-4.1","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello to the benchmark, please."}],"max_tokens":64}'
)
STREAM_BODY = CHAT_BODY[:-1] + b',"stream":true}'


#: Quota limits: every kind the quota layer enforces is present (so each request does the
#: full reserve/settle work), set far above what a benchmark can reach. A full load run sends
#: about 1.5 M requests of ~USD 0.0006 (gpt-4.1, ~30 prompt + 64 reserved output tokens), so
#: USD 10,000 a day is never reached; c=64 is the most concurrent requests any point sends.
BENCH_LIMITS: dict[str, Any] = {
    "requests_per_second": 1_000_000,
    "requests_per_minute": 100_000_000,
    "tokens_per_minute": 10_000_000_000,
    "tokens_per_day": 1_000_000_000_000,
    "concurrent_requests": 1024,
    "daily_budget_usd": "10000",
    "monthly_budget_usd": "100000",
}


def layer_settings(
    backend: str, workdir: str | None = None, ledger_url: str | None = None
) -> dict[str, Any]:
    """Settings of the policy layers: all on, enforced, and generous enough that no benchmark
    request is refused or queued behind a limit.

    - quota: the tenant's limits above (``BENCH_LIMITS``) plus a global requests-per-second
      limit, so a request touches tenant and global counters as in production.
    - admission: the fair scheduler with 256 seats: present on every request (a seat is taken
      and released), work-conserving at the highest concurrency the benchmark drives (64).
    - breaker: on with its defaults (deployment and tenant circuits, retries); the fake
      upstream does not fail, so no circuit opens and no request is retried.
    - metering: on, the ledger writer batching records off the request path; the SQLite
      ledger in ``workdir`` unless the caller passes ``ledger_url`` (the Redis run passes a
      PostgreSQL one with a fresh ``?schema=``). ``backend`` needs nothing more here: Redis
      is ``gateway.redis_url``, which every layer's store follows. ``request_log`` stays
      **on** (the default): a deployment keeps its per-request log line, and the writer
      renders it after the response is sent, so it costs gateway CPU (counted in CPU per
      request) but no latency. It is rendered as JSON lines (``configure_logging``) into
      ``TW_BENCH_LOG`` (default ``/dev/null``).
    """
    metering: dict[str, Any] = {"enabled": True, "request_log": True}
    if ledger_url:
        metering["ledger_url"] = ledger_url
    else:
        directory = workdir or tempfile.mkdtemp(prefix="twbench-")
        metering["ledger_url"] = "sqlite:///" + os.path.join(
            os.path.abspath(directory), "ledger.db"
        )
    return {
        "quota": {"enabled": True, "global_limits": {"requests_per_second": 1_000_000}},
        "admission": {"enabled": True, "scheduler": "fair", "seats": 256},
        "breaker": {"enabled": True},
        "metering": metering,
    }


def bench_config(
    upstream_url: str,
    *,
    backend: str = "memory",
    redis_url: str | None = None,
    redis_prefix: str = "twbench:",
    ledger_url: str | None = None,
    workdir: str | None = None,
    cache: str = "none",
) -> dict[str, Any]:
    """One tenant with enforced but never-reached limits, one upstream serving every model.

    ``workdir`` holds the SQLite ledger of the memory run (a fresh temp dir when omitted).
    ``cache``: ``hit`` opts the tenant into the response cache (every repeated request is a
    hit), ``miss`` too but with a zero quota (every request takes the whole miss path);
    ``off``/``none``: not opted in.
    """
    gateway: dict[str, Any] = {}
    if backend == "redis":
        if not redis_url:
            raise ValueError("the redis backend needs a redis_url")
        gateway["redis_url"] = redis_url
        gateway["redis_prefix"] = redis_prefix
    data: dict[str, Any] = {
        "gateway": gateway,
        "tenants": [
            {
                "id": "bench",
                "tier": "enterprise",
                "limits": BENCH_LIMITS,
                "keys": [{"id": "bench-1", "hash": KeyHasher().hash(BENCH_KEY)}],
                **(
                    {
                        "data": {
                            "cache_models": ["*"],
                            "cache_quota_bytes": 0 if cache == "miss" else 64 * 1024 * 1024,
                        }
                    }
                    if cache in ("miss", "hit")
                    else {}
                ),
            }
        ],
        "upstreams": [
            {
                "name": "fake",
                "base_url": upstream_url,
                "models": ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
                "timeout_s": 30,
            }
        ],
    }
    data.update(layer_settings(backend, workdir, ledger_url))
    return data


_SINKS: dict[str, Any] = {}


def configure_logging() -> None:
    """Production-style structlog output: one JSON line per event, rendered with msgspec.

    Unconfigured, structlog would pretty-print every request line to the console (the dev
    renderer), which no deployment runs. ``TW_BENCH_LOG`` names the file (default
    ``/dev/null``: the rendering is paid, the disk is not).
    """
    from tenantware.logs import configure_json_logging

    path = os.environ.get("TW_BENCH_LOG") or os.devnull
    sink = _SINKS.get(path)
    if sink is None:
        # Kept open for the process (a server's log file lives as long as the server).
        sink = _SINKS[path] = open(path, "wb")  # noqa: SIM115
    configure_json_logging(sink)
