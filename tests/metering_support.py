"""Helpers of the metering tests: a gateway with a memory ledger, ASGI calls by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio

from tenantware import Gateway
from tenantware.metering.ledger import MemoryLedger, UsageRecord
from tenantware.types import Message
from tests.support import CHAT, KEYS, receive_body_then


def scope_for(
    path: str = "/v1/chat/completions",
    key: str = KEYS["acme"],
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            *(headers or []),
        ],
        "query_string": query,
    }


async def call_streaming(
    app: Any,
    body: dict[str, Any],
    *,
    disconnect_after: int | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> list[bytes]:
    """Call ``app`` directly; the client leaves after ``disconnect_after`` body parts."""
    raw = json.dumps(body).encode()
    gone = anyio.Event()
    received: list[bytes] = []

    async def disconnected() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if disconnect_after is not None and len(received) >= disconnect_after:
                gone.set()

    with anyio.fail_after(10):
        await app(scope_for(headers=headers), receive_body_then(raw, disconnected), send)
    return received


async def records_of(gateway: Gateway) -> list[UsageRecord]:
    """Every record, after the writer flushed what it holds."""
    assert gateway.writer is not None
    await gateway.writer.flush()
    ledger = gateway.ledger
    assert isinstance(ledger, MemoryLedger)
    return await ledger.query()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


STREAM = {**CHAT, "stream": True}
