"""The upstream hop behind one small interface, with an aiohttp and an httpx implementation.

aiohttp is the default: relaying a request through it costs about a quarter of the CPU of
httpx's default transport on this kind of machine. The httpx client stays for any anyio
backend (trio) and for in-process tests through ``httpx.ASGITransport``/``MockTransport``.
Both clients are created lazily on first use (so they bind to the running loop) and must be
closed with ``aclose()`` (the gateway's lifespan does it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
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


class UpstreamResponse(Protocol):
    status: int
    #: Relayable headers as lower-case ASGI pairs.
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

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
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = _relayable(response.raw_headers)

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            # ``readany`` directly: ``iter_any()`` would add an async iterator per chunk.
            while chunk := await content.readany():
                yield chunk
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc

    def close_now(self) -> None:
        """Synchronous close (aiohttp's release/close never wait): callers need no shield."""
        self._response.release()
        self._response.close()

    async def aclose(self) -> None:
        self.close_now()


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
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = _relayable(response.headers.raw)

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc) or "upstream timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc) or "upstream timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
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
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(str(exc) or "upstream timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
