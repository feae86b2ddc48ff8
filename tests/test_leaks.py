"""Rejected requests leave nothing behind: a credential-stuffing burst must not grow memory.

20,000 refused requests of six kinds go through the whole stack that ``Gateway`` builds,
called in-process (no sockets). Every refusal must free its request context: the count of live
``RequestContext`` objects after a collection stays flat, and so does the memory tracemalloc
sees between a warm-up batch and the end.
"""

from __future__ import annotations

import gc
import itertools
import json
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.context import RequestContext
from tenantware.metering.ledger.record import UsageRecord
from tenantware.testing.upstream import FakeUpstream
from tenantware.types import ASGIApp, Message, Receive, Scope
from tests.support import CHAT, KEYS, make_config, tenant_entries

pytestmark = pytest.mark.anyio

TOTAL = 20_000
WARM_UP = 2_000
#: Live contexts allowed after a collection: a handful in flight or cached, never thousands.
MAX_LIVE_CONTEXTS = 30
#: Traced growth allowed between the warm-up and the end (caches settling, allocator noise).
MAX_GROWTH_BYTES = 512 * 1024


class _CountingLedger:
    """Counts the records it is given and keeps none (a memory ledger would grow by design)."""

    def __init__(self) -> None:
        self.written = 0

    async def open(self) -> None:
        return None

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.written += len(records)

    async def query(
        self, *, tenant: str | None = None, since: float = 0.0, until: float | None = None
    ) -> list[UsageRecord]:
        return []

    async def aclose(self) -> None:
        return None


def _scope(key: str | None, body: bytes) -> Scope:
    headers = [(b"host", b"gateway.test"), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode()))
    headers.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
        "headers": headers,
    }


def _sender(statuses: list[int]) -> Callable[[Message], Any]:
    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return send


def _receiver(body: bytes, *, gone: bool = False) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if gone or sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


GOOD = json.dumps(CHAT).encode()
HOBBY = json.dumps({**CHAT, "model": "gemini-2.5-flash", "max_tokens": 5}).encode()
#: (name, key, body, client leaves before its body, expected status)
KINDS: list[tuple[str, str | None, bytes, bool, int | None]] = [
    ("bad key", "sk-wrong-key", GOOD, False, 401),
    ("missing key", None, GOOD, False, 401),
    ("malformed body", KEYS["acme"], b'{"model": "gpt-4.1", "messages": [', False, 400),
    ("unknown model", KEYS["acme"], json.dumps({**CHAT, "model": "nope"}).encode(), False, 404),
    ("quota refusal", KEYS["hobby"], HOBBY, False, 429),
    ("client gone", KEYS["acme"], GOOD, True, None),
]


async def _batch(app: ASGIApp, start: int, count: int, statuses: list[int]) -> None:
    send = _sender(statuses)
    for i in range(start, start + count):
        _name, key, body, gone, _status = KINDS[i % len(KINDS)]
        await app(_scope(key, body), _receiver(body, gone=gone), send)


def _live_contexts() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is RequestContext)


async def _drained(gateway: Gateway) -> None:
    writer = gateway.writer
    assert writer is not None
    with anyio.fail_after(10):
        while writer.pending:
            await anyio.sleep(0.01)


async def test_rejected_requests_free_their_context_and_memory() -> None:
    tenants = tenant_entries()
    # hobby may send one request a minute: every later one is a quota refusal.
    tenants[1].update(tier="plain", limits={"requests_per_minute": 1})
    config = make_config(
        tenants=tenants,
        tiers={"plain": {}},
        metering={"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.01},
        # The refusals are counted for the tenant's circuit, which never trips here: every
        # kind keeps its own answer.
        breaker={"tenant": {"consecutive_failures": 10**9, "minimum_calls": 10**9}},
    )
    fake = FakeUpstream()
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    ledger = _CountingLedger()
    gateway = Gateway(config, upstream_client=client, ledger=ledger)
    app = gateway.asgi_app()
    statuses: list[int] = []
    async with gateway.running():
        # The one request hobby may send goes upstream; it is not part of the count.
        await app(_scope(KEYS["hobby"], HOBBY), _receiver(HOBBY), _sender([]))
        tracemalloc.start()
        try:
            await _batch(app, 0, WARM_UP, statuses)
            await _drained(gateway)
            baseline_contexts = _live_contexts()
            baseline_bytes = tracemalloc.get_traced_memory()[0]
            await _batch(app, WARM_UP, TOTAL - WARM_UP, statuses)
            await _drained(gateway)
            final_contexts = _live_contexts()
            final_bytes = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    # Every kind was answered as it should (the client that left gets no answer).
    expected = [kind[4] for kind in KINDS if kind[4] is not None]
    answered = len(KINDS) - 1
    assert len(statuses) == TOTAL // len(KINDS) * answered + sum(
        1 for i in range(TOTAL % len(KINDS)) if KINDS[i][4] is not None
    )
    assert set(statuses) == set(expected)
    for status, kind in zip(statuses, itertools.cycle(expected), strict=False):
        assert status == kind
    # The refusals of a known tenant (bad body, unknown model, quota) were metered.
    assert ledger.written >= 3 * (TOTAL // len(KINDS))

    assert baseline_contexts <= MAX_LIVE_CONTEXTS
    assert final_contexts <= MAX_LIVE_CONTEXTS, f"{final_contexts} request contexts still alive"
    growth = final_bytes - baseline_bytes
    assert growth <= MAX_GROWTH_BYTES, f"traced memory grew by {growth} bytes"
