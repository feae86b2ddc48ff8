"""One gateway process for the prepaid-balance proofs (run as ``python -m``).

It builds a gateway on a shared Redis (quota state, balances) and a shared PostgreSQL ledger,
prints ``ready``, waits for the common start time on stdin, sends its ``requests`` at once
(chat requests, top-ups, redemptions or payment webhooks, per ``mode``), lets the ledger
writer flush, and prints one JSON report line: ``(status, body)`` per call. The inner app
answers at once and reports usage equal to the estimate, so a request costs what it reserved.
The parent's side (``run_workers``) is here too.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec

from tenantware import Gateway, KeyHasher, get_context, parse_config
from tenantware.context import Usage
from tenantware.types import Receive, Scope, Send

#: USD per million output tokens of the proof's model (input is free: cost = output only).
OUTPUT_PER_MTOK = 2
MAX_TOKENS = 100
#: What one chat request costs: 100 output tokens at 2 USD per million.
REQUEST_NANOUSD = MAX_TOKENS * OUTPUT_PER_MTOK * 1000
KEYS = {"buyer": "sk-buyer", "other": "sk-other"}
ADMIN = "sk-proof-admin"
PAY_SECRET_ENV = "TW_PROOF_PAY_SECRET"


class Job(msgspec.Struct, frozen=True):
    redis_url: str
    prefix: str
    ledger_url: str
    #: ``spend`` (chat requests) or ``credits`` (``requests`` each of one top-up, one code's
    #: redemption and one payment event, all retried concurrently).
    mode: str
    requests: int
    #: For ``credits``: the top-up body and key, the code, the webhook body and signature.
    payload: dict[str, Any] = {}


class Report(msgspec.Struct):
    #: ``(kind of call, status, body)`` per call.
    calls: list[tuple[str, int, str]]


def config(job: Job) -> dict[str, Any]:
    hasher = KeyHasher()
    return {
        "gateway": {
            "redis_url": job.redis_url,
            "redis_prefix": job.prefix,
            "admin_keys": [{"id": "ops", "hash": hasher.hash(ADMIN)}],
            "payment_webhooks": {"test": {"secret_env": PAY_SECRET_ENV}},
        },
        "metering": {"ledger_url": job.ledger_url, "request_log": False, "batch_size": 200},
        "admission": {"enabled": False},
        "models": {"unit": {"input_per_mtok": "0", "output_per_mtok": str(OUTPUT_PER_MTOK)}},
        "include_default_models": False,
        "tiers": {"plain": {}},
        "tenants": [
            {
                "id": name,
                "tier": "plain",
                "billing": "prepaid",
                "keys": [{"id": f"{name}-1", "hash": hasher.hash(key)}],
            }
            for name, key in KEYS.items()
        ],
        "upstreams": [{"name": "fake", "base_url": "http://upstream.test/v1", "models": ["unit"]}],
    }


async def main(job: Job) -> Report:
    gateway = Gateway(parse_config(config(job)))
    report = Report(calls=[])

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        await receive()
        ctx.usage = Usage(input_tokens=ctx.estimated_prompt_tokens, output_tokens=MAX_TOKENS)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    api = gateway.wrap(inner)
    admin = gateway.asgi_app()
    chat = {
        "model": "unit",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "hi"}],
    }
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        gateway.running(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://gw", limits=limits
        ) as api_client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=admin), base_url="http://gw", limits=limits
        ) as admin_client,
    ):

        async def one(kind: str, number: int) -> None:
            payload = job.payload
            if kind == "spend":
                response = await api_client.post(
                    "/v1/chat/completions",
                    json=chat,
                    headers={"authorization": f"Bearer {KEYS['buyer']}"},
                )
            elif kind == "topup":
                response = await admin_client.post(
                    "/admin/tenants/buyer/balance/topups",
                    json=payload["body"],
                    headers={
                        "authorization": f"Bearer {ADMIN}",
                        "idempotency-key": payload["key"],
                    },
                )
            elif kind == "redeem":
                tenant = "buyer" if number % 2 == 0 else "other"
                response = await admin_client.post(
                    f"/admin/tenants/{tenant}/balance/redeem",
                    json={"code": payload["code"]},
                    headers={"authorization": f"Bearer {KEYS[tenant]}"},
                )
            else:
                response = await admin_client.post(
                    "/admin/payments/test",
                    content=payload["event"].encode(),
                    headers={"tw-signature": payload["signature"]},
                )
            report.calls.append((kind, response.status_code, response.text))

        sys.stdout.write("ready\n")
        sys.stdout.flush()
        start_at = float(await anyio.to_thread.run_sync(sys.stdin.readline))
        await anyio.sleep(max(0.0, start_at - time.time()))
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                kinds = ["spend"] if job.mode == "spend" else ["topup", "redeem", "payment"]
                for number in range(job.requests):
                    for kind in kinds:
                        group.start_soon(one, kind, number)
    # Leaving ``running()`` flushed the ledger writer: every debit is journaled.
    return report


# -- the parent's side -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def run_workers(jobs: list[Job], env: dict[str, str], timeout_s: float = 120.0) -> list[Report]:
    """One process per job, started together once all are ready; their reports."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.balance_worker", msgspec.json.encode(job).decode()],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        for job in jobs
    ]
    try:
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            assert proc.stdout is not None
            while True:
                ready, _, _ = select.select(
                    [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
                )
                line = proc.stdout.readline() if ready else b""
                if line == b"ready\n":
                    break
                if not line:
                    assert proc.stderr is not None
                    proc.kill()
                    raise AssertionError(proc.stderr.read().decode()[-3000:])
        start_at = time.time() + 0.2
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at!r}\n".encode())
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, err.decode()[-3000:]
            reports.append(msgspec.json.decode(out.splitlines()[-1], type=Report))
        return reports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


if __name__ == "__main__":
    job = msgspec.json.decode(sys.argv[1], type=Job)
    result = anyio.run(main, job)
    sys.stdout.write("\n" + msgspec.json.encode(result).decode() + "\n")
