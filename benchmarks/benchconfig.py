"""The gateway configuration every benchmark runs with, built as a plain dict.

Layers that land later add their knobs in :func:`layer_settings` (one place), so the load
benchmark and the micro-benchmarks measure the whole stack as ``Gateway`` builds it.
"""

from __future__ import annotations

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


def layer_settings(backend: str) -> dict[str, Any]:
    """Settings of the policy layers, generous enough that no benchmark request is refused.

    ``backend`` is ``"memory"`` or ``"redis"``; the quota, admission, breaker and metering
    layers add their sections here when they land (keys of ``GatewayConfig``).
    """
    return {}


def bench_config(
    upstream_url: str,
    *,
    backend: str = "memory",
    redis_url: str | None = None,
    redis_prefix: str = "twbench:",
    ledger_url: str | None = None,
) -> dict[str, Any]:
    """One tenant with unlimited-enough limits, one upstream serving every model."""
    gateway: dict[str, Any] = {}
    if backend == "redis":
        if not redis_url:
            raise ValueError("the redis backend needs a redis_url")
        gateway["redis_url"] = redis_url
        gateway["redis_prefix"] = redis_prefix
    if ledger_url:
        gateway["ledger_url"] = ledger_url
    data: dict[str, Any] = {
        "gateway": gateway,
        "tenants": [
            {
                "id": "bench",
                "tier": "enterprise",
                "limits": {
                    "requests_per_minute": 100_000_000,
                    "tokens_per_minute": 10_000_000_000,
                    "concurrent_requests": 100_000,
                },
                "keys": [{"id": "bench-1", "hash": KeyHasher().hash(BENCH_KEY)}],
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
    data.update(layer_settings(backend))
    return data
