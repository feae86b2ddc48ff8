"""One gateway process for the shared-Redis fairness test (run as ``python -m``).

It wraps a sleeping inner app in the full stack with the Redis seat pool, keeps every tenant
backlogged through a common wall-clock window (sent on stdin once every process
printed ``ready``), and prints the completion times (unix seconds)
per tenant as JSON.
"""

from __future__ import annotations

import sys
import time

import anyio
import httpx
import msgspec

from tenantware import Gateway, get_context, parse_config
from tenantware.context import Usage
from tenantware.types import Receive, Scope, Send

WEIGHTS = {"gold": 0.5, "silver": 0.35, "bronze": 0.15}


def config(redis_url: str, prefix: str, seats: int) -> dict[str, object]:
    from tenantware import KeyHasher

    hasher = KeyHasher()
    return {
        "gateway": {"redis_url": redis_url, "redis_prefix": prefix, "redis_timeout_s": 2.0},
        "admission": {"seats": seats, "max_queue_per_tenant": 64},
        # Only admission is under test: no rate limits, no request log on stdout (the result).
        "quota": {"enabled": False},
        "metering": {"enabled": False},
        "tenants": [
            {
                "id": name,
                "tier": "pro",
                "weight": weight,
                "keys": [{"id": f"{name}-1", "hash": hasher.hash(f"sk-{name}")}],
            }
            for name, weight in WEIGHTS.items()
        ],
        "upstreams": [
            {"name": "fake", "base_url": "http://upstream.test/v1", "models": ["gpt-4.1"]}
        ],
    }


async def sleepy(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = get_context(scope)
    await receive()
    await anyio.sleep(0.1)
    ctx.usage = Usage(input_tokens=100, output_tokens=100)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def main(redis_url: str, prefix: str, seats: int) -> None:
    gateway = Gateway(parse_config(config(redis_url, prefix, seats)))
    app = gateway.wrap(sleepy)
    done: dict[str, list[float]] = {name: [] for name in WEIGHTS}
    body = {"model": "gpt-4.1", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    async with gateway.running():
        # The window starts only when every process is ready: on a loaded host, start-up
        # alone can outlast a window fixed in advance.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        start_at, stop_at = (float(part) for part in line.split())
        await anyio.sleep(max(0.0, start_at - time.time()))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

            async def loop(name: str) -> None:
                headers = {"authorization": f"Bearer sk-{name}"}
                while time.time() < stop_at:
                    response = await client.post("/v1/chat/completions", json=body, headers=headers)
                    if response.status_code == 200:
                        done[name].append(time.time())

            async with anyio.create_task_group() as group:
                for name in WEIGHTS:
                    for _ in range(14):
                        group.start_soon(loop, name)
    sys.stdout.write(msgspec.json.encode(done).decode())


if __name__ == "__main__":
    url, prefix, seats = sys.argv[1:4]
    anyio.run(main, url, prefix, int(seats))
