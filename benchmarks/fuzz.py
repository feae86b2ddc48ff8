"""Fuzz run (issue 21): fuzzed requests against a ``tenantware serve --demo`` gateway on
loopback whose fake upstream reports hostile usage (``fuzz_gateway.py``). Outside CI.

    python benchmarks/fuzz.py                     # 20,000 requests, 16 at a time, <= 15 min
    python benchmarks/fuzz.py --requests 2000 --json out.json

Requests are written on raw sockets (one connection each), so bodies and headers can be what
no HTTP client library would send: JSON nested 1,000 deep, invalid UTF-8, wrong types, huge
numbers, duplicate ``Host``, absolute-form URLs, wrong keys, long headers, odd routes and
methods. Every request has a 10 s timeout (a "hang") and the run a deadline. The report:
counts by status and category, every 500 with its request, hangs, the gateway's RSS before and
after, error lines in its log, and what the ledger holds after a graceful stop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEYS = {"acme": "sk-demo-acme", "hobby": "sk-demo-hobby"}
ADMIN = "sk-demo-admin"
MODELS = ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2", "gpt4", "nope"]
TIMEOUT_S = 10.0
#: Route variants left out (``--skip``), to find which one a figure comes from.
SKIPPED: set[str] = set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- requests ----------------------------------------------------------------------------------


def http(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    key: str | None = KEYS["acme"],
    headers: list[tuple[str, bytes]] | None = None,
    host: bytes = b"127.0.0.1",
    content_length: int | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host, b"Connection: close"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    for name, value in headers or []:
        lines.append(name.encode() + b": " + value)
    if body or method == "POST":
        if not any(name.lower() == "content-type" for name, _ in headers or []):
            lines.append(b"Content-Type: application/json")
        length = len(body) if content_length is None else content_length
        lines.append(b"Content-Length: " + str(length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(MODELS),
        "messages": [{"role": "user", "content": "hi " * rng.randint(1, 50)}],
    }
    if rng.random() < 0.5:
        body["stream"] = True
        if rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.7:
        body["max_tokens"] = rng.randint(1, 40)
    if rng.random() < 0.2:
        body["n"] = rng.randint(1, 3)
    return body


def valid(rng: random.Random) -> tuple[str, bytes]:
    key = KEYS["hobby"] if rng.random() < 0.25 else KEYS["acme"]
    body = json.dumps(chat_body(rng)).encode()
    return "valid", http("POST", "/v1/chat/completions", body, key=key)


def hostile_json(rng: random.Random) -> tuple[str, bytes]:
    depth = rng.choice([100, 1000, 5000])
    stream = rng.random() < 0.5
    head = b'{"model":"gpt-4.1","stream":%s,"messages":[{"role":"user","content":' % (
        b"true" if stream else b"false"
    )
    variants: dict[str, bytes] = {
        "deep_array": head + b'"x"}],"extra":' + b"[" * depth + b"]" * depth + b"}",
        "deep_object": head + b'"x"}],"extra":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
        "deep_messages": b'{"model":"gpt-4.1","messages":' + b"[" * depth + b"]" * depth + b"}",
        "invalid_utf8": head + b'"caf\xc3\x28 \xff\xfe"}]}',
        "invalid_utf8_alias": head.replace(b"gpt-4.1", b"gpt4") + b'"\xed\xa0\x80"}]}',
        "lone_surrogate": head + b'"\\ud800"}]}',
        "huge_numbers": head + b'"x"}],"max_tokens":' + b"9" * 400 + b',"n":1e400}',
        "negative_max": head + b'"x"}],"max_tokens":-5,"n":-2}',
        "wrong_types": b'{"model":5,"messages":"x","stream":"yes","max_tokens":"10"}',
        "null_body": b"null",
        "array_body": b"[1,2,3]",
        "empty": b"",
        "truncated": head + b'"x"}',
        "nan": head + b'"x"}],"temperature":NaN}',
        "duplicate_keys": b'{"model":"gpt-4.1","model":"nope","messages":[]}',
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))),
        "big_string": head + b'"' + b"a" * rng.choice([10_000, 1_000_000]) + b'"}]}',
        "no_messages": b'{"model":"gpt-4.1"}',
        "stream_options_junk": head + b'"x"}],"stream_options":{"include_usage":"maybe"}}',
    }
    name = rng.choice(sorted(variants))
    path = rng.choice(["/v1/chat/completions"] * 4 + ["/v1/completions", "/v1/embeddings"])
    return f"json:{name}", http("POST", path, variants[name])


def hostile_headers(rng: random.Random) -> tuple[str, bytes]:
    body = json.dumps(chat_body(rng)).encode()
    variants: dict[str, bytes] = {
        "no_key": http("POST", "/v1/chat/completions", body, key=None),
        "wrong_key": http("POST", "/v1/chat/completions", body, key="sk-wrong-" + "x" * 40),
        "binary_key": http(
            "POST",
            "/v1/chat/completions",
            body,
            key=None,
            headers=[("Authorization", b"Bearer \xff\xfe\x00sk")],
        ),
        "double_host": http(
            "POST", "/v1/chat/completions", body, headers=[("Host", b"ai.acme.example")]
        ),
        "trailing_dot_host": http("POST", "/v1/chat/completions", body, host=b"ai.acme.example."),
        "absolute_url": http("POST", "http://ai.acme.example/v1/chat/completions", body),
        "cost_center_junk": http(
            "POST",
            "/v1/chat/completions",
            body,
            headers=[("x-cost-center", b"=cmd|' /C calc'!A0\xff")],
        ),
        "long_header": http(
            "POST", "/v1/chat/completions", body, headers=[("x-junk", b"a" * 16_000)]
        ),
        "request_id_junk": http(
            "POST", "/v1/chat/completions", body, headers=[("x-request-id", b"\x01\x7f" * 400)]
        ),
        "text_content_type": http(
            "POST", "/v1/chat/completions", body, headers=[("Content-Type", b"text/plain")]
        ),
        "short_content_length": http(
            "POST", "/v1/chat/completions", body, content_length=max(0, len(body) // 2)
        ),
        "many_headers": http(
            "POST",
            "/v1/chat/completions",
            body,
            headers=[(f"x-h{i}", b"v") for i in range(rng.choice([50, 200]))],
        ),
    }
    name = rng.choice(sorted(variants))
    return f"headers:{name}", variants[name]


def routes(rng: random.Random) -> tuple[str, bytes]:
    variants: dict[str, bytes] = {
        "models": http("GET", "/v1/models"),
        "models_no_v1_no_key": http("GET", "/models", key=None),
        "usage": http("GET", "/v1/usage?since=24h&period=hour"),
        "usage_bad_query": http("GET", "/v1/usage?since=yesterday&period=%ff&format=xml"),
        "usage_other_tenant": http("GET", "/v1/usage?tenant=hobby"),
        "admin_no_key": http("GET", "/admin/usage", key=None),
        "admin": http("GET", "/admin/usage?period=day&format=csv", key=ADMIN),
        "admin_bad": http("GET", "/admin/usage?since=%00&until=-1&period=year", key=ADMIN),
        "metrics_no_key": http("GET", "/metrics", key=None),
        "readyz": http("GET", "/readyz", key=None),
        "healthz": http("GET", "/healthz", key=None),
        "unknown": http("GET", "/v1/" + "x" * rng.randint(1, 3000)),
        "wrong_method": http("DELETE", "/v1/chat/completions"),
        "get_chat": http("GET", "/v1/chat/completions"),
        "embeddings": http(
            "POST",
            "/v1/embeddings",
            json.dumps({"model": "gpt-4.1", "input": rng.choice(["x", [], [[1, 2]], 5])}).encode(),
        ),
        "completions": http(
            "POST",
            "/v1/completions",
            json.dumps({"model": "gpt-4.1", "prompt": "hi", "stream": rng.random() < 0.5}).encode(),
        ),
        "demo_upstream_no_key": http(
            "POST", "/_demo_upstream/v1/chat/completions", b"{}", key=None
        ),
    }
    name = rng.choice(sorted(set(variants) - SKIPPED))
    return f"route:{name}", variants[name]


def make_request(rng: random.Random, only: str | None = None) -> tuple[str, bytes]:
    if only is not None:
        return {"valid": valid, "json": hostile_json, "headers": hostile_headers}.get(only, routes)(
            rng
        )
    kind = rng.random()
    if kind < 0.40:
        return valid(rng)
    if kind < 0.65:
        return hostile_json(rng)
    if kind < 0.85:
        return hostile_headers(rng)
    return routes(rng)


# -- the run -----------------------------------------------------------------------------------


async def send_one(port: int, raw: bytes) -> tuple[str, bytes]:
    """``(status or failure, first bytes of the response)``."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(raw)
                await writer.drain()
                data = await reader.read(-1)
            finally:
                writer.close()
    except TimeoutError:
        return "hang", b""
    except (ConnectionError, OSError) as exc:
        return f"conn:{type(exc).__name__}", b""
    if not data:
        return "no_response", b""
    parts = data.split(b" ", 2)
    status = parts[1].decode("latin-1") if len(parts) > 1 else "garbled"
    return status, data[:600]


async def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    by_status: collections.Counter[str] = collections.Counter()
    by_category: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    errors: list[dict[str, str]] = []
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=args.concurrency * 2)
    deadline = time.monotonic() + args.seconds

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            category, raw = item
            status, head = await send_one(port, raw)
            by_status[status] += 1
            by_category[category][status] += 1
            failed = status.startswith("5") or not status[:1].isdigit()
            if failed and by_category[category][status] <= 3:  # three examples of each
                errors.append(
                    {
                        "category": category,
                        "status": status,
                        "request": raw[:300].decode("latin-1"),
                        "response": head.decode("latin-1"),
                    }
                )

    # Warm up (imports, pools, first ledger writes) before the first RSS reading.
    for _ in range(200):
        await send_one(port, valid(rng)[1])
    rss_before = rss_kb(pid)
    started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    sent = 0
    rss_series: list[tuple[int, float]] = []
    for _ in range(args.requests):
        if time.monotonic() > deadline:
            break
        await queue.put(make_request(rng, args.only))
        sent += 1
        if sent % 2000 == 0:
            rss_series.append((sent, round(rss_kb(pid) / 1024, 1)))
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - started
    rss_after = rss_kb(pid)
    ready = await send_one(port, http("GET", "/readyz", key=None))
    metrics = await send_one(port, http("GET", "/metrics", key=ADMIN))
    return {
        "requests": sent,
        "seconds": round(elapsed, 1),
        "by_status": dict(sorted(by_status.items())),
        "by_category": {k: dict(sorted(v.items())) for k, v in sorted(by_category.items())},
        "errors": errors,
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_after_mb": round(rss_after / 1024, 1),
        "rss_mb_by_requests_sent": rss_series,
        "readyz": ready[0],
        "metrics_head": metrics[0],
    }


def metrics_lines(port: int) -> list[str]:
    async def fetch() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http("GET", "/metrics", key=ADMIN))
        await writer.drain()
        data = await reader.read(-1)
        writer.close()
        return data

    text = asyncio.run(fetch()).decode("utf-8", "replace")
    wanted = ("tenantware_usage_anomalies_total", "tenantware_ledger_")
    return [line for line in text.splitlines() if line.startswith(wanted)]


def ledger_summary(directory: Path) -> dict[str, Any]:
    db = directory / "tenantware-ledger.db"
    if not db.exists():
        return {"ledger": "missing"}
    conn = sqlite3.connect(db)
    try:
        total, invalid, estimated, negative, top = conn.execute(
            "SELECT count(*), sum(usage_invalid), sum(estimated), "
            "sum(input_tokens < 0 OR output_tokens < 0 OR cost_nanousd < 0), "
            "max(output_tokens) FROM usage_records"
        ).fetchone()
    finally:
        conn.close()
    dead = directory / "tenantware-ledger.db.dead.jsonl"
    return {
        "records": total,
        "usage_invalid": invalid,
        "estimated": estimated,
        "negative": negative,
        "max_output_tokens": top,
        "dead_letters": len(dead.read_bytes().splitlines()) if dead.exists() else 0,
    }


def log_summary(path: Path) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        lowered = line.lower()
        for marker in ("traceback", '"level": "error"', '"level":"error"', "exception"):
            if marker in lowered:
                counts[marker] += 1
                samples.setdefault(marker, line[:400])
        if "upstream usage unusable" in line:
            counts["usage_anomaly_log_lines"] += 1
    return {"counts": dict(counts), "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=900, help="deadline of the run")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--json", type=Path, help="write the report here too")
    parser.add_argument(
        "--only", choices=["valid", "json", "headers", "routes"], help="one kind of request"
    )
    parser.add_argument("--skip", action="append", default=[], help="a route variant to leave out")
    args = parser.parse_args()
    SKIPPED.update(args.skip)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tw-fuzz-") as tmp:
        directory = Path(tmp)
        log_path = directory / "gateway.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, str(HERE / "fuzz_gateway.py"), "--port", str(port)],
                cwd=directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "TW_FUZZ_SEED": str(args.seed),
                    # The demo's ledger, where ledger_summary() reads it after the stop.
                    "TENANTWARE_DEMO_LEDGER": f"sqlite:///{directory}/tenantware-ledger.db",
                },
            )
            try:
                for _ in range(300):
                    status, _head = asyncio.run(send_one(port, http("GET", "/healthz", key=None)))
                    if status == "200":
                        break
                    time.sleep(0.1)
                else:
                    raise SystemExit("the gateway did not start")
                report = asyncio.run(run(args, port, server.pid))
                report["metrics"] = metrics_lines(port)
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        report["ledger"] = ledger_summary(directory)
        report["log"] = log_summary(log_path)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
