"""``tenantware serve``'s protocol writes a response of known length in one piece.

The protocol is driven directly with a transport that records its writes, so each case
shows exactly what reaches the socket and in how many writes: a JSON answer (head and body
together), a stream (head at once, then each chunk), HEAD, ``100 Continue``, a body sent in
several messages, a large body, and an app that fails after its head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from tenantware.server_limits import GuardedHttpToolsProtocol, ServeLimits
from tenantware.types import ASGIApp, Receive, Scope, Send


class RecordingTransport(asyncio.Transport):
    """Collects every write; ``closed`` once the protocol closes the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        #: Whether the server had closed it before the test ended the connection.
        self.closed_by_server = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


def _exchange(app: ASGIApp, request: bytes) -> RecordingTransport:
    """Serve one request through the protocol; the transport with what was written."""

    async def run() -> RecordingTransport:
        ServeLimits().export()
        config = uvicorn.Config(app, http=GuardedHttpToolsProtocol, lifespan="off")
        config.load()
        protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(request)
        for _ in range(100):  # bounded: the app's task runs within a few loop turns
            await asyncio.sleep(0)
            if protocol.cycle is not None and (
                protocol.cycle.response_complete or transport.closed
            ):
                break
        transport.closed_by_server = transport.closed
        protocol.connection_lost(None)
        return transport

    return asyncio.run(run())


def _app(*messages: dict[str, Any], fail: bool = False) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await receive()
        for message in messages:
            await send(message)
        if fail:
            raise RuntimeError("the app failed after its head")

    return app


def _start(*headers: tuple[bytes, bytes], status: int = 200) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def _body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
JSON = b'{"id":"chatcmpl-1","object":"chat.completion"}'
JSON_LENGTH = (b"content-length", str(len(JSON)).encode())
JSON_TYPE = (b"content-type", b"application/json")


def test_a_json_answer_is_one_write() -> None:
    transport = _exchange(_app(_start(JSON_TYPE, JSON_LENGTH), _body(JSON)), POST)
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: %d" % len(JSON) in head
    assert body == JSON
    assert not transport.closed_by_server


def test_a_stream_writes_its_head_at_once_and_each_chunk_as_it_comes() -> None:
    events = [b"data: 1\n\n", b"data: 2\n\n"]
    app = _app(
        _start((b"content-type", b"text/event-stream")),
        _body(events[0], more=True),
        _body(events[1], more=True),
        _body(b""),
    )
    transport = _exchange(app, POST)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert transport.writes[1:] == [
        b"9\r\n" + events[0] + b"\r\n",
        b"9\r\n" + events[1] + b"\r\n",
        b"0\r\n\r\n",
    ]


def test_a_body_in_several_messages_is_joined_only_to_its_first_part() -> None:
    app = _app(
        _start(JSON_TYPE, JSON_LENGTH), _body(JSON[:10], more=True), _body(JSON[10:], more=False)
    )
    transport = _exchange(app, POST)
    assert len(transport.writes) == 2
    assert transport.writes[0].endswith(b"\r\n\r\n" + JSON[:10])
    assert transport.writes[1] == JSON[10:]


def test_a_large_body_is_written_after_the_head_without_a_copy() -> None:
    big = b"x" * (256 * 1024)
    transport = _exchange(_app(_start((b"content-length", b"%d" % len(big))), _body(big)), POST)
    assert len(transport.writes) == 2
    assert transport.writes[0].endswith(b"\r\n\r\n")
    assert transport.writes[1] == big


def test_a_head_request_gets_its_head() -> None:
    request = b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
    transport = _exchange(_app(_start(JSON_TYPE, JSON_LENGTH), _body(b"")), request)
    assert b"".join(transport.writes).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"".join(transport.writes).endswith(b"\r\n\r\n")


def test_an_empty_body_with_its_length_is_one_write() -> None:
    transport = _exchange(_app(_start((b"content-length", b"0")), _body(b"")), POST)
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"content-length: 0\r\n\r\n")


def test_100_continue_is_written_before_the_answer() -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
        b"content-length: 2\r\n\r\n"
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # receive() is where uvicorn writes "100 Continue"; the body never comes here, so
        # the app answers without waiting for it.
        waiting = asyncio.ensure_future(receive())
        await asyncio.sleep(0)
        await send(_start(JSON_TYPE, JSON_LENGTH))
        await send(_body(JSON))
        waiting.cancel()

    transport = _exchange(app, request)
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(JSON)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_app_that_fails_after_its_head_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="uvicorn.error")
    transport = _exchange(_app(_start(JSON_TYPE, JSON_LENGTH), fail=True), POST)
    assert transport.closed_by_server
    # No head without its body reaches the client.
    assert transport.writes == []


def test_keep_alive_requests_each_get_one_write() -> None:
    two = POST + POST
    calls: list[Callable[[], None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        calls.append(lambda: None)
        await send(_start(JSON_TYPE, JSON_LENGTH))
        await send(_body(JSON))

    async def run() -> RecordingTransport:
        ServeLimits().export()
        config = uvicorn.Config(app, http=GuardedHttpToolsProtocol, lifespan="off")
        config.load()
        protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(two)
        for _ in range(200):
            await asyncio.sleep(0)
            if len(calls) == 2 and protocol.cycle.response_complete:
                break
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert len(calls) == 2
    assert len(transport.writes) == 2
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(JSON) for w in transport.writes)
