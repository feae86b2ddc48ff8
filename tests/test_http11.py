"""The HTTP/1.1 fast path (``proxy/http11.py``): framing, pooling, the re-send rule, time
limits and back-pressure, against the fake upstream and small raw asyncio servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tenantware import Gateway
from tenantware.proxy.fast_path import FastPathUpstreamClient, takes_fast_path
from tenantware.proxy.http11 import DECODED_CHUNK, HIGH_WATER, Http11UpstreamClient
from tenantware.proxy.upstream import (
    AiohttpUpstreamClient,
    Timeouts,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.support import (
    CHAT,
    KEYS,
    client_for,
    make_config,
    receive_body_then,
    stream_scope,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """On asyncio's own loop and on uvloop's (the loop ``tenantware serve`` runs)."""
    return "asyncio", {"use_uvloop": request.param}


TIMEOUTS = Timeouts(5.0, 5.0, 5.0, 10.0)
JSON = {"content-type": "application/json", "accept-encoding": "identity"}
BODY = json.dumps(CHAT).encode()

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- a raw server ---------------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and ``content-length`` body), ``None`` at the end of the stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


def answer(body: bytes = b"{}", *headers: str, status: str = "200 OK") -> bytes:
    lines = "".join(f"{header}\r\n" for header in headers)
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{lines}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def chunked(*pieces: bytes, headers: str = "") -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + headers.encode()
    out += b"transfer-encoding: chunked\r\n\r\n"
    for piece in pieces:
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


class RawServer:
    """A loopback server running ``handler`` per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.ended = 0  # connections the client closed (EOF seen by the handler)
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly (the stream callback reads its result)
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        request = await read_request(reader)
        if request is None:
            self.ended += 1
        else:
            self.requests.append(request)
        return request


def keep_answering(response: bytes = answer(b'{"ok":true}')) -> Handler:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            writer.write(response)

    return handler


@contextlib.asynccontextmanager
async def raw(handler: Handler) -> AsyncIterator[tuple[RawServer, Http11UpstreamClient]]:
    async with RawServer(handler) as server:
        client = Http11UpstreamClient()
        try:
            yield server, client
        finally:
            await client.aclose()


async def post(client: Any, url: str, timeouts: Timeouts = TIMEOUTS, **headers: str) -> Any:
    return await client.request(
        "POST", url, headers={**JSON, **headers}, body=BODY, timeouts=timeouts
    )


async def settle(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded in turns, not in time)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition never held")


# -- against the fake upstream --------------------------------------------------------------


@pytest.fixture
def fake() -> Any:
    upstream = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(upstream) as url:
        yield upstream, url


@pytest.fixture
async def client() -> AsyncIterator[Http11UpstreamClient]:
    client = Http11UpstreamClient()
    try:
        yield client
    finally:
        await client.aclose()


async def read_whole(response: Any) -> bytes:
    try:
        data: bytes = await response.read(1 << 20)
    finally:
        response.close_now()
    return data


async def test_a_json_answer_from_the_fake_upstream_is_read_whole(
    fake: Any, client: Http11UpstreamClient
) -> None:
    upstream, url = fake
    response = await post(client, url + "/v1/chat/completions")
    data = json.loads(await read_whole(response))
    assert response.status == 200
    assert (b"content-type", b"application/json") in response.headers
    assert data["object"] == "chat.completion"
    assert upstream.last_request.json() == CHAT


async def test_a_stream_from_the_fake_upstream_arrives_chunk_by_chunk(
    fake: Any, client: Http11UpstreamClient
) -> None:
    upstream, url = fake
    upstream.config.chunk_delay_s = 0.001
    response = await client.request(
        "POST",
        url + "/v1/chat/completions",
        headers=JSON,
        body=json.dumps({**CHAT, "stream": True}).encode(),
        timeouts=TIMEOUTS,
    )
    pieces = [chunk async for chunk in response.chunks()]
    response.close_now()
    assert response.header("content-type").startswith("text/event-stream")
    assert len(pieces) > 1
    assert b"".join(pieces).endswith(b"data: [DONE]\n\n")


async def test_traceparent_and_the_other_request_headers_reach_the_upstream(
    fake: Any, client: Http11UpstreamClient
) -> None:
    upstream, url = fake
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = await post(
        client, url + "/v1/chat/completions", traceparent=traceparent, x_custom="v"
    )
    await read_whole(response)
    headers = upstream.last_request.headers
    assert headers["traceparent"] == traceparent
    assert headers["x_custom"] == "v"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == url.removeprefix("http://")


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_an_upstream_error_status_is_relayed_with_its_headers(
    fake: Any, client: Http11UpstreamClient, status: int
) -> None:
    upstream, url = fake
    upstream.config.fail_next = [status]
    upstream.config.retry_after_s = 7
    response = await post(client, url + "/v1/chat/completions")
    data = json.loads(await read_whole(response))
    assert response.status == status
    assert "error" in data
    if status == 429:
        assert response.header("Retry-After") == "7"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_get_and_delete_reach_the_upstream_without_a_body(
    fake: Any, client: Http11UpstreamClient, method: str
) -> None:
    upstream, url = fake
    response = await client.request(
        method, url + "/v1/responses/resp_missing", headers=JSON, body=b"", timeouts=TIMEOUTS
    )
    await read_whole(response)
    assert response.status == 404
    assert upstream.last_request.method == method
    assert "content-length" not in upstream.last_request.headers


async def test_calls_in_turn_reuse_one_pooled_connection(
    fake: Any, client: Http11UpstreamClient
) -> None:
    _, url = fake
    for _ in range(3):
        response = await post(client, url + "/v1/chat/completions")
        await read_whole(response)
    port = int(url.rpartition(":")[2])
    assert client.idle_connections("127.0.0.1", port) == 1


# -- framing -----------------------------------------------------------------------------------


async def test_a_keep_alive_connection_serves_every_call_in_turn() -> None:
    async with raw(keep_answering()) as (server, client):
        for _ in range(3):
            response = await post(client, server.url)
            assert await response.read(100) == b'{"ok":true}'
            response.close_now()
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_a_content_length_body_is_read_to_its_length() -> None:
    async with raw(keep_answering(answer(b"x" * 100_000))) as (server, client):
        response = await post(client, server.url)
        assert await response.read(1 << 20) == b"x" * 100_000
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 1


async def test_a_chunked_body_is_read_to_its_last_chunk() -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    async with raw(keep_answering(chunked(*pieces))) as (server, client):
        response = await post(client, server.url)
        assert await response.read(1 << 20) == b"".join(pieces)
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 1


async def test_a_body_framed_by_the_end_of_the_connection_is_read_and_not_pooled() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        assert await response.read(100) == b"until the end"
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 0


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", lambda data: zlib.compress(data, wbits=16 + zlib.MAX_WBITS)),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_a_compressed_body_is_decoded_as_aiohttp_does(
    encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    text = b'{"text":"' + b"compressible " * 1000 + b'"}'
    reply = answer(compress(text), f"content-encoding: {encoding}")
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        assert await response.read(1 << 20) == text
        response.close_now()


async def test_a_compressed_stream_is_decoded_chunk_by_chunk() -> None:
    text = b"data: " + b"y" * 5000 + b"\n\n"
    packed = zlib.compress(text, wbits=16 + zlib.MAX_WBITS)
    reply = chunked(packed[:40], packed[40:], headers="content-encoding: gzip\r\n")
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        got = b""
        while chunk := await response.read_chunk():
            got += chunk
        response.close_now()
    assert got == text


async def test_a_highly_compressed_body_is_decoded_in_bounded_pieces() -> None:
    packed = zlib.compress(b"\0" * (64 * 1024 * 1024), wbits=16 + zlib.MAX_WBITS)
    reply = answer(packed, "content-encoding: gzip")
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        sizes = [len(await response.read_chunk()) for _ in range(3)]
        response.close_now()
        response = await post(client, server.url)
        with pytest.raises(UpstreamTooLarge):
            await response.read(1024 * 1024)
        response.close_now()
    assert max(sizes) <= DECODED_CHUNK


async def test_headers_keep_every_value_in_lower_case_and_header_finds_the_first() -> None:
    reply = answer(
        b"{}",
        "Retry-After: 3",
        "X-Should-Retry: true",
        "x-should-retry: false",
        "Set-Cookie: account=upstream",
    )
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        await response.read(100)
        response.close_now()
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"retry-after", b"3"),
        (b"x-should-retry", b"true"),
        (b"x-should-retry", b"false"),
    ]
    assert response.header("x-should-retry") == "true"
    assert response.header("RETRY-AFTER") == "3"
    assert response.header("set-cookie") == "account=upstream"
    assert response.header("x-missing") is None


async def test_a_head_request_ends_at_the_headers_whatever_content_length_says() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")

    async with raw(handler) as (server, client):
        response = await client.request("HEAD", server.url, headers={}, body=b"", timeouts=TIMEOUTS)
        assert await response.read(10) == b""
        response.close_now()
    assert server.requests[0].startswith(b"HEAD /v1/chat/completions HTTP/1.1\r\n")


async def test_a_no_content_answer_has_an_empty_body_and_is_pooled() -> None:
    reply = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with raw(keep_answering(reply)) as (server, client):
        response = await client.request(
            "DELETE", server.url, headers={}, body=b"", timeouts=TIMEOUTS
        )
        assert response.status == 204
        assert await response.read(10) == b""
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 1


async def test_an_informational_answer_is_skipped_for_the_final_one() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"final":1}')
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        assert response.status == 200
        assert await response.read(100) == b'{"final":1}'
        response.close_now()


async def test_the_request_line_host_and_content_length_are_written_by_the_client() -> None:
    async with raw(keep_answering()) as (server, client):
        response = await client.request(
            "POST",
            f"http://127.0.0.1:{server.port}/v1/x y?q=1#frag",
            headers={"Content-Length": "999", "x-a": "1"},
            body=b"abc",
            timeouts=TIMEOUTS,
        )
        await response.read(100)
        response.close_now()
    request = server.requests[0]
    assert request.startswith(b"POST /v1/x%20y?q=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}\r\n".encode() in request
    assert b"content-length: 3\r\n" in request
    assert request.lower().count(b"content-length") == 1  # the caller's 999 is dropped
    assert request.endswith(b"\r\n\r\nabc")


async def test_a_host_header_from_the_caller_is_used() -> None:
    async with raw(keep_answering()) as (server, client):
        response = await post(client, server.url, host="api.example")
        await response.read(100)
        response.close_now()
    assert b"host: api.example\r\n" in server.requests[0]
    assert server.requests[0].count(b"host:") == 1


async def test_a_newline_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with raw(keep_answering()) as (server, client):
        with pytest.raises(ValueError, match="newline"):
            await post(client, server.url, x_evil="a\r\nx-injected: 1")
    assert server.requests == []


# -- sizes -------------------------------------------------------------------------------------


def writes_then_waits(data: bytes) -> Handler:
    """Reads one request, writes ``data`` and waits until the client closes."""

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(data)
        await server.request(reader)

    return handler


@pytest.mark.parametrize(
    "start",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 50000000\r\n\r\n",
        chunked(*[b"z" * 1000] * 20)[: -len(b"0\r\n\r\n")],
    ],
    ids=["declared-length", "chunked"],
)
async def test_a_body_over_the_limit_is_too_large_and_its_connection_closed(start: bytes) -> None:
    async with raw(writes_then_waits(start)) as (server, client):
        response = await post(client, server.url)
        with pytest.raises(UpstreamTooLarge):
            await response.read(5000)
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 0
        await settle(lambda: server.ended == 1)


async def test_a_slow_reader_does_not_buffer_the_whole_answer() -> None:
    total = 64 * 1024 * 1024
    sent = [0]

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"b" * 65536
        while sent[0] < total:
            writer.write(piece)
            sent[0] += len(piece)
            await writer.drain()

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        await response.read_chunk()
        conn = response._conn
        await settle(lambda: conn.paused)
        before = sent[0]
        for _ in range(50):  # the reader sleeps: nothing more is taken in
            await asyncio.sleep(0.002)
        assert conn.buffered <= HIGH_WATER + 1024 * 1024
        assert sent[0] < total
        # Reading resumes the socket.
        await response.read_chunk()
        assert not conn.paused
        await settle(lambda: sent[0] > before)
        response.close_now()


# -- pooling and closing ---------------------------------------------------------------------


async def test_closing_mid_body_closes_the_connection_and_pools_nothing() -> None:
    unfinished = chunked(b"first")[: -len(b"0\r\n\r\n")]
    async with raw(writes_then_waits(unfinished)) as (server, client):
        response = await post(client, server.url)
        assert await response.read_chunk() == b"first"
        assert response.close_now() is None
        assert client.idle_connections("127.0.0.1", server.port) == 0
        await settle(lambda: server.ended == 1)


async def test_aclose_of_an_unread_answer_closes_its_connection() -> None:
    async with raw(keep_answering(answer(b"unread"))) as (server, client):
        response = await post(client, server.url)
        await response.aclose()
        # The answer had fully arrived with its headers (one write): it may be pooled,
        # or it was closed; either way the next call works.
        response = await post(client, server.url)
        assert await response.read(100) == b"unread"
        response.close_now()


async def test_an_answer_with_connection_close_is_not_pooled() -> None:
    reply = answer(b"{}", "connection: close")
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        await response.read(100)
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 0


async def test_bytes_after_the_answer_keep_it_but_the_connection_is_not_reused() -> None:
    reply = answer(b'{"n":1}') + answer(b'{"n":2}')
    async with raw(keep_answering(reply)) as (server, client):
        response = await post(client, server.url)
        assert await response.read(100) == b'{"n":1}'
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 0
        response = await post(client, server.url)
        assert await response.read(100) == b'{"n":1}'
        response.close_now()
    assert server.connections == 2


def answering_once_open(gate: asyncio.Event) -> Handler:
    """Reads each request at once, answers it once ``gate`` is set."""

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            await gate.wait()
            writer.write(answer())

    return handler


async def test_concurrent_calls_use_separate_connections() -> None:
    gate = asyncio.Event()
    async with raw(answering_once_open(gate)) as (server, client):
        calls = [asyncio.ensure_future(post(client, server.url)) for _ in range(3)]
        await settle(lambda: len(server.requests) == 3)
        gate.set()
        for response in await asyncio.gather(*calls):
            await response.read(100)
            response.close_now()
        assert server.connections == 3
        assert client.idle_connections("127.0.0.1", server.port) == 3


async def test_the_pool_size_bounds_the_connections_in_use() -> None:
    gate = asyncio.Event()
    async with RawServer(answering_once_open(gate)) as server:
        client = Http11UpstreamClient(pool_size=2)
        try:

            async def call() -> None:
                response = await post(client, server.url)
                await response.read(100)
                response.close_now()

            calls = [asyncio.ensure_future(call()) for _ in range(5)]
            await settle(lambda: len(server.requests) == 2)
            gate.set()
            await asyncio.gather(*calls)
        finally:
            await client.aclose()
    assert server.most_open == 2
    assert len(server.requests) == 5


async def test_waiting_for_a_free_connection_is_bounded_by_the_total_timeout() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(answer())
        await reader.read()

    async with RawServer(handler) as server:
        client = Http11UpstreamClient(pool_size=1)
        try:
            held = await post(client, server.url)
            with pytest.raises(UpstreamTimeout, match="free"):
                await post(client, server.url, Timeouts(1.0, 1.0, 1.0, 0.05))
            held.close_now()
        finally:
            await client.aclose()


async def test_an_idle_connection_older_than_keepalive_is_not_reused() -> None:
    async with RawServer(keep_answering()) as server:
        client = Http11UpstreamClient(keepalive_s=0.0)
        try:
            for _ in range(2):
                response = await post(client, server.url)
                await response.read(100)
                response.close_now()
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_idle_connections_are_closed_once_their_keepalive_is_over() -> None:
    async with RawServer(keep_answering()) as server:
        client = Http11UpstreamClient(keepalive_s=0.02)
        try:
            response = await post(client, server.url)
            await read_whole(response)
            await settle(lambda: server.ended == 1)  # closed by the client, unasked
            assert client.idle_connections("127.0.0.1", server.port) == 0
        finally:
            await client.aclose()


async def test_a_call_cancelled_before_its_answer_frees_its_connection() -> None:
    gate = asyncio.Event()
    async with RawServer(answering_once_open(gate)) as server:
        client = Http11UpstreamClient(pool_size=1)
        try:
            waiting = asyncio.ensure_future(post(client, server.url))
            await settle(lambda: len(server.requests) == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            gate.set()
            response = await post(client, server.url)  # the pool's one place is free again
            assert await read_whole(response) == b"{}"
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_aclose_closes_the_pooled_connections() -> None:
    async with RawServer(keep_answering()) as server:
        client = Http11UpstreamClient()
        response = await post(client, server.url)
        await response.read(100)
        response.close_now()
        await client.aclose()
        await settle(lambda: server.ended == 1)
        assert not client._all  # every connection closed is forgotten


# -- the re-send rule --------------------------------------------------------------------------


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(answer())
        await writer.drain()
        # Closes the kept-alive connection, as a server's idle timeout does.

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        await response.read(100)
        response.close_now()
        await settle(lambda: client.idle_connections("127.0.0.1", server.port) == 0)
        response = await post(client, server.url)
        assert await response.read(100) == b"{}"
        response.close_now()
    assert server.connections == 2
    assert len(server.requests) == 2


def _drops_second_request() -> Handler:
    """Answers a connection's first request, reads its second and closes without a byte."""

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(answer())
        if await server.request(reader) is not None:
            writer.transport.abort()

    return handler


async def test_a_post_the_server_may_have_read_is_never_sent_again() -> None:
    async with raw(_drops_second_request()) as (server, client):
        response = await post(client, server.url)
        await response.read(100)
        response.close_now()
        with pytest.raises(UpstreamConnectError):
            await post(client, server.url)
    assert len(server.requests) == 2
    assert server.connections == 1


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_an_idempotent_call_on_a_stale_connection_is_sent_again_once(method: str) -> None:
    async with raw(_drops_second_request()) as (server, client):
        for _ in range(2):
            response = await client.request(
                method, server.url, headers={}, body=b"", timeouts=TIMEOUTS
            )
            assert await response.read(100) == b"{}"
            response.close_now()
    assert len(server.requests) == 3
    assert server.connections == 2


async def test_the_second_sending_takes_a_new_connection_not_another_pooled_one() -> None:
    async with raw(_drops_second_request()) as (server, client):

        async def get() -> None:
            response = await client.request(
                "GET", server.url, headers={}, body=b"", timeouts=TIMEOUTS
            )
            assert await read_whole(response) == b"{}"

        await asyncio.gather(get(), get())  # two pooled connections, both about to drop
        assert client.idle_connections("127.0.0.1", server.port) == 2
        await get()
    assert len(server.requests) == 4
    assert server.connections == 3


async def test_a_new_connection_closed_before_answering_is_an_error_not_a_resend() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.transport.abort()

    async with raw(handler) as (server, client):
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", server.url, headers={}, body=b"", timeouts=TIMEOUTS)
    assert len(server.requests) == 1


async def test_a_body_framed_by_the_connection_cut_by_a_reset_is_an_error() -> None:
    headers_read = asyncio.Event()

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart")
        await headers_read.wait()
        # SO_LINGER 0: the close sends a reset, not the end of the stream.
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        headers_read.set()
        with pytest.raises(UpstreamConnectError, match="before its answer ended"):
            await read_whole(response)


async def test_a_connection_closed_mid_body_is_an_error() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        with pytest.raises(UpstreamConnectError, match="before its answer ended"):
            await response.read(1000)
        response.close_now()


# -- failures and time limits ------------------------------------------------------------------


async def _drain(response: Any) -> None:
    while await response.read_chunk():
        pass


async def _read_whole(client: Http11UpstreamClient, url: str) -> None:
    response = await post(client, url)
    try:
        await response.read(1000)
    finally:
        response.close_now()


@pytest.mark.parametrize(
    "reply",
    [b"HELLO there\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
    ids=["status-line", "chunk-size"],
)
async def test_a_malformed_answer_is_a_clear_error(reply: bytes) -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(reply)
        await reader.read()

    async with raw(handler) as (server, client):
        with pytest.raises(UpstreamConnectError, match="malformed"):
            await _read_whole(client, server.url)


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with RawServer(keep_answering()) as server:
        url = server.url
    client = Http11UpstreamClient()
    try:
        with pytest.raises(UpstreamConnectError):
            await post(client, url)
    finally:
        await client.aclose()


async def test_connecting_longer_than_the_connect_timeout_times_out() -> None:
    async with raw(keep_answering()) as (server, client):
        with pytest.raises(UpstreamTimeout, match="connecting"):
            await post(client, server.url, Timeouts(0.0, 1.0, 1.0, 1.0))


async def test_no_headers_within_the_first_byte_timeout_times_out() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        await reader.read()

    async with raw(handler) as (server, client):
        with pytest.raises(UpstreamTimeout, match="no answer"):
            await post(client, server.url, Timeouts(1.0, 0.05, 5.0, 5.0))
        assert client.idle_connections("127.0.0.1", server.port) == 0


async def test_a_body_stalled_longer_than_the_idle_timeout_times_out() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(chunked(b"data: 1\n\n")[: -len(b"0\r\n\r\n")])
        await reader.read()

    async with raw(handler) as (server, client):
        response = await post(client, server.url, Timeouts(1.0, 1.0, 0.05, 5.0))
        assert await response.read_chunk() == b"data: 1\n\n"
        with pytest.raises(UpstreamTimeout, match="idle"):
            await response.read_chunk()
        response.close_now()


async def test_a_body_still_flowing_at_the_total_timeout_times_out() -> None:
    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"9\r\ndata: 1\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.005)

    async with raw(handler) as (server, client):
        response = await post(client, server.url, Timeouts(1.0, 1.0, 1.0, 0.1))
        with pytest.raises(UpstreamTimeout, match="total"):
            await _drain(response)
        response.close_now()


# -- routing and configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fast"),
    [
        ("http://127.0.0.1:9000/v1/chat/completions", True),
        ("http://upstream.internal/v1", True),
        ("https://api.openai.com/v1/chat/completions", False),
        ("http://user:secret@127.0.0.1:9000/v1", False),
        ("HTTP://127.0.0.1:9000/v1", True),
        ("http://127.0.0.1:notaport/v1", False),
        ("http://bücher.example/v1", False),
    ],
)
def test_only_plain_http_urls_without_credentials_take_the_fast_path(url: str, fast: bool) -> None:
    assert takes_fast_path(url) is fast


async def test_the_routing_client_sends_http_calls_to_the_fast_path(fake: Any) -> None:
    _, url = fake
    client = FastPathUpstreamClient()
    try:
        response = await post(client, url + "/v1/chat/completions")
        await read_whole(response)
        port = int(url.rpartition(":")[2])
        assert client.fast.idle_connections("127.0.0.1", port) == 1
        assert client.general._session is None  # aiohttp never started
    finally:
        await client.aclose()


def test_the_gateway_uses_the_fast_path_unless_configured_off() -> None:
    assert isinstance(Gateway(make_config()).proxy.client, FastPathUpstreamClient)
    off = make_config(gateway={"upstream_fast_path": False})
    assert isinstance(Gateway(off).proxy.client, AiohttpUpstreamClient)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "aiohttp"])
async def test_the_gateway_answers_alike_with_the_fast_path_on_and_off(
    fake: Any, fast: bool
) -> None:
    _, url = fake
    gateway = Gateway(make_config(url + "/v1", gateway={"upstream_fast_path": fast}))
    try:
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as http:
            whole = await http.post("/v1/chat/completions", json=CHAT)
            stream = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    finally:
        await gateway.proxy.aclose()
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"]
    assert whole.headers["content-type"] == "application/json"
    assert stream.status_code == 200
    assert stream.text.endswith("data: [DONE]\n\n")


def test_the_fast_path_refuses_a_url_it_does_not_serve() -> None:
    client = Http11UpstreamClient()
    with pytest.raises(ValueError, match="plain http"):
        client._target("https://api.openai.com/v1")


async def test_ended_tells_when_the_bytes_read_complete_the_body() -> None:
    """The relay sends the last event with the response's end when ``ended`` says so; a body
    that ended that way is pooled on close without a read of ``b""``."""
    go_on = asyncio.Event()
    first, last = b"data: 1\n\n", b"data: [DONE]\n\n"

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            whole = chunked(first, last)
            cut = whole.index(b"%x\r\n%s" % (len(last), last))
            writer.write(whole[:cut])
            await go_on.wait()
            writer.write(whole[cut:])

    async with raw(handler) as (server, client):
        response = await post(client, server.url)
        assert await response.read_chunk() == first
        assert not response.ended
        go_on.set()
        assert await response.read_chunk() == last
        await settle(lambda: response.ended)
        response.close_now()
        assert client.idle_connections("127.0.0.1", server.port) == 1


async def test_a_slow_client_holds_the_upstream_back_through_the_relay() -> None:
    """The relay reads the next event only once the client took the last: while the client
    does not read, the upstream is held back (nothing piles up in the gateway)."""
    total = 256 * 1024 * 1024
    sent = [0]
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 60000}}]}).encode()
    event += b"\n\n"

    async def handler(server: RawServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        while sent[0] < total:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            sent[0] += len(event)
            await writer.drain()

    async with RawServer(handler) as server:
        gateway = Gateway(make_config(f"http://127.0.0.1:{server.port}/v1"))
        released, gone = asyncio.Event(), asyncio.Event()
        bodies: list[int] = []
        body = json.dumps({**CHAT, "stream": True}).encode()

        async def disconnected() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                bodies.append(len(message.get("body", b"")))
                await released.wait()  # a client that does not read

        receive = receive_body_then(body, disconnected)
        task = asyncio.create_task(gateway.asgi_app()(stream_scope(), receive, send))
        try:
            await settle(lambda: bool(bodies))
            last = -1
            for _ in range(500):  # until the upstream's writes stop
                if sent[0] == last:
                    break
                last = sent[0]
                await asyncio.sleep(0.02)
            assert sent[0] == last < total
            assert len(bodies) == 1
            gone.set()
            released.set()
            await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
            await gateway.proxy.aclose()
