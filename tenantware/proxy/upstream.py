"""The upstream hop behind one small interface, with an aiohttp and an httpx implementation.

aiohttp is the default: relaying a request through it costs about a quarter of the CPU of
httpx's default transport on this kind of machine. The httpx client stays for any anyio
backend (trio) and for in-process tests through ``httpx.ASGITransport``/``MockTransport``.
Both clients are created lazily on first use (so they bind to the running loop) and must be
closed with ``aclose()`` (the gateway's lifespan does it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Mapping
from typing import Protocol

import aiohttp
import httpx

__all__ = [
    "AiohttpUpstreamClient",
    "HttpxUpstreamClient",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnavailable",
]

#: Response headers worth relaying to the client; the rest describe the upstream account.
_RELAYED_HEADERS = frozenset(
    {"content-type", "retry-after", "retry-after-ms", "x-should-retry", "openai-processing-ms"}
)
_RELAYED_RAW = frozenset(name.encode() for name in _RELAYED_HEADERS)


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or did not answer in time."""


class UpstreamConnectError(UpstreamUnavailable):
    """Connecting failed or the connection broke."""


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream did not answer (or send the next bytes) within the timeout."""


class UpstreamTooLarge(Exception):
    """The upstream's answer is larger than the gateway relays (not retried elsewhere: the
    upstream works, its answer is the problem)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream answer exceeds {limit} bytes")
        self.limit = limit


class UpstreamResponse(Protocol):
    """An upstream answer, read whole (``read``) or as it arrives (``read_chunk``)."""

    status: int
    #: Relayable headers as lower-case ASGI pairs.
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None: ...

    async def read(self, max_bytes: int) -> bytes:
        """The whole body; ``UpstreamTooLarge`` as soon as it is known to exceed
        ``max_bytes`` (from ``content-length``, else while reading), never buffering more."""
        ...

    async def read_chunk(self) -> bytes:
        """The next non-empty bytes of the body, ``b""`` at its end: the proxy's stream relay
        calls it once per event (no async generator step, unlike iterating ``chunks()``)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close_now(self) -> Awaitable[None] | None:
        """Close the response: at once when it can (``None``: nothing left to wait for, so no
        cancellation can cut it short and no shield is needed), else the awaitable that
        finishes closing (the caller awaits it shielded)."""
        ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


def _relayable(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The relayable headers of the raw byte pairs as received: no str round trip."""
    return [(lower, value) for name, value in raw if (lower := name.lower()) in _RELAYED_RAW]


class _AiohttpResponse:
    __slots__ = ("_idle_s", "_loop", "_response", "_since", "_watchdog", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, idle_s: float) -> None:
        self._response = response
        self.status = response.status
        self.headers = _relayable(response.raw_headers)
        #: The upstream's read timeout: the longest wait for its next bytes.
        self._idle_s = idle_s
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When the pending ``read_chunk`` started waiting; -1 while none waits.
        self._since = -1.0
        self._watchdog: asyncio.TimerHandle | None = None

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read(self, max_bytes: int) -> bytes:
        response = self._response
        length = response.content_length
        if length is not None and length > max_bytes:
            raise UpstreamTooLarge(max_bytes)
        # Read as ``ClientResponse.read`` does, counting: ``content-length`` may be absent
        # (chunked) and counts compressed bytes.
        content = response.content
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamTooLarge(max_bytes)
                chunks.append(chunk)
        except UpstreamTooLarge:
            raise
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrived, ``b""`` at the end of the body."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._watch_idle(loop)
        self._since = loop.time()
        try:
            # ``readany`` directly: ``iter_any()`` would add an async iterator per chunk.
            return await self._response.content.readany()
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        finally:
            self._since = -1.0

    def _watch_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out a streamed body's reads with one timer per stream, not one per chunk.

        aiohttp's ``sock_read`` re-arms a timer for every chunk it receives (a libuv timer
        under uvloop: a few µs, twenty-odd times per stream). For the body of a stream it is
        switched off here and one watchdog checks, once per timeout period, whether a read has
        been waiting that long: the same timeout, whichever ``read_chunk`` it hits.
        """
        connection = self._response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None or not self._idle_s:
            return  # the body has arrived whole: nothing left to wait for
        # Takes effect at the next chunk, which cancels the timer aiohttp armed at the last.
        protocol.read_timeout = None
        self._watchdog = loop.call_at(loop.time() + self._idle_s, self._check_idle)

    def _check_idle(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        since = self._since
        if since < 0:  # not waiting (the relay is busy with the last chunk)
            since = now
        elif now - since >= self._idle_s:
            self._watchdog = None
            exc = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
            connection = self._response.connection
            if connection is not None and connection.protocol is not None:
                connection.protocol.set_exception(exc)
            self._response.content.set_exception(exc)
            return
        self._watchdog = self._loop.call_at(since + self._idle_s, self._check_idle)

    def close_now(self) -> None:
        """Synchronous close (aiohttp's release/close never wait): callers need no shield."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        self._response.release()
        self._response.close()

    async def aclose(self) -> None:
        self.close_now()


def _translate_httpx(exc: httpx.TransportError) -> UpstreamUnavailable:
    """httpx's transport errors as the proxy's two kinds of upstream failure."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(str(exc) or "upstream timed out")
    return UpstreamConnectError(str(exc) or type(exc).__name__)


def _translate_aiohttp(exc: Exception) -> Exception:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(str(exc) or "upstream timed out")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    return exc


class AiohttpUpstreamClient:
    """One pooled ``aiohttp.ClientSession`` shared by all requests of a process."""

    def __init__(self, *, pool_size: int = 0, keepalive_s: float = 30.0) -> None:
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        #: One ``ClientTimeout`` per (read, connect) pair: upstreams have fixed timeouts.
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _timeout(self, timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientTimeout:
        key = (timeout_s, connect_timeout_s)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout_s, sock_read=timeout_s
            )
            if len(self._timeouts) < 256:
                self._timeouts[key] = timeout
        return timeout

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, keepalive_timeout=self._keepalive_s, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=True
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> UpstreamResponse:
        session = self._session or self._get_session()
        timeout = self._timeouts.get((timeout_s, connect_timeout_s)) or self._timeout(
            timeout_s, connect_timeout_s
        )
        try:
            # aiohttp copies ``headers`` into its own multidict: no copy needed here.
            response = await session.request(
                method, url, data=body or None, headers=headers, timeout=timeout
            )
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        return _AiohttpResponse(response, timeout_s)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _HttpxResponse:
    __slots__ = ("_iterator", "_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = _relayable(response.headers.raw)
        self._iterator: AsyncGenerator[bytes, None] | None = None

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def read(self, max_bytes: int) -> bytes:
        length = self._response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise UpstreamTooLarge(max_bytes)
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > max_bytes:
                raise UpstreamTooLarge(max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise _translate_httpx(exc) from exc

    async def read_chunk(self) -> bytes:
        """The next non-empty bytes of the body, ``b""`` at its end."""
        if self._iterator is None:
            self._iterator = self.chunks()
        async for chunk in self._iterator:
            if chunk:
                return chunk
        return b""

    def close_now(self) -> Awaitable[None]:
        """httpx closes asynchronously: the caller awaits this, shielded."""
        return self.aclose()

    async def aclose(self) -> None:
        if self._iterator is not None:
            # Finalise the generator now rather than whenever the collector finds it.
            await self._iterator.aclose()
        await self._response.aclose()


class HttpxUpstreamClient:
    """Upstream hop over one shared ``httpx.AsyncClient`` (pass ``transport=`` in tests)."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            )
        return self._client

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> UpstreamResponse:
        client = self._get_client()
        request = client.build_request(
            method,
            url,
            headers=headers,
            content=body or None,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _translate_httpx(exc) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
