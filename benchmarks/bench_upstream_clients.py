#!/usr/bin/env python
"""CPU per upstream call of the available HTTP clients, and a lower bound for a fast path.

    taskset -c 0 python benchmarks/bench_upstream_clients.py --port PORT aiohttp floor aiosonic

Each client sends 16 concurrent streams of POSTs (the benchmark chat body) to a running fake
upstream (``python -m tenantware.testing.upstream --port PORT`` on the other core) and reads
the whole answer; the figure is this process's CPU time per call (``time.process_time``), the
clients measured in rotated order, four rounds. ``aiohttp`` is called as
``AiohttpUpstreamClient`` calls it, ``http11`` is the gateway's fast path
(``Http11UpstreamClient``, with its timeouts and pooling). ``floor`` is not a client: a keep-
alive HTTP/1.1 exchange on an asyncio protocol with httptools and nothing else (no timeouts, no
chunked bodies, no TLS, no error handling), the least any client could cost on this loop — what
a narrow fast path could save at most. ``aiosonic`` and ``httpx`` are optional (installed
separately).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import uvloop

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from benchconfig import CHAT_BODY  # noqa: E402

HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
PATH = "/v1/chat/completions"


class _Exchange(asyncio.Protocol):
    """One kept-alive connection: a request written whole, the answer parsed by httptools."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set_result(b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))


class _Floor:
    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[_Exchange] = []
        self.head = b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % (PATH.encode(), port)
        self.head += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in HEADERS.items())

    async def call(self) -> None:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(_Exchange, "127.0.0.1", self.port)
        assert conn.transport is not None
        conn.waiter = loop.create_future()
        conn.transport.write(self.head + b"content-length: %d\r\n\r\n" % len(CHAT_BODY) + CHAT_BODY)
        await conn.waiter
        self.idle.append(conn)

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


async def _client(kind: str, port: int) -> tuple[Callable[[], Awaitable[None]], Any]:
    url = f"http://127.0.0.1:{port}{PATH}"
    if kind == "aiohttp":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)

        async def call() -> None:
            response = await session.request(
                "POST", url, data=CHAT_BODY, headers=HEADERS, timeout=timeout
            )
            await response.read()
            response.release()

        return call, session.close
    if kind == "http11":
        from tenantware.proxy.http11 import Http11UpstreamClient
        from tenantware.proxy.upstream import Timeouts

        http11 = Http11UpstreamClient()
        timeouts = Timeouts(10.0, 30.0, 30.0, 60.0)

        async def call() -> None:
            response = await http11.request(
                "POST", url, headers=HEADERS, body=CHAT_BODY, timeouts=timeouts
            )
            await response.read(1 << 24)
            response.close_now()

        return call, http11.aclose
    if kind == "aiosonic":
        import aiosonic  # type: ignore[import-not-found, unused-ignore]

        sonic = aiosonic.HTTPClient()

        async def call() -> None:
            response = await sonic.post(url, data=CHAT_BODY, headers=HEADERS)
            await response.content()

        return call, None
    if kind == "httpx":
        import httpx

        client = httpx.AsyncClient()

        async def call() -> None:
            response = await client.post(url, content=CHAT_BODY, headers=HEADERS)
            response.read()

        return call, client.aclose
    floor = _Floor(port)
    return floor.call, floor.close


async def _measure(kind: str, port: int, calls: int, concurrency: int) -> float:
    call, close = await _client(kind, port)

    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # connections, caches
    per_worker = calls // concurrency
    started = time.process_time()
    await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    cpu = time.process_time() - started
    if close is not None:
        await close()
    return cpu / (per_worker * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "kinds", nargs="+", choices=["aiohttp", "http11", "floor", "aiosonic", "httpx"]
    )
    parser.add_argument("--port", type=int, required=True, help="a running fake upstream")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[float]] = {kind: [] for kind in args.kinds}
    for round_ in range(args.rounds):
        shift = round_ % len(args.kinds)
        for kind in args.kinds[shift:] + args.kinds[:shift]:
            results[kind].append(uvloop.run(_measure(kind, args.port, args.calls, 16)))
    for kind, values in results.items():
        print(
            f"{kind}: CPU per call min {min(values):.1f} µs, median "
            f"{statistics.median(values):.1f} µs (load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
