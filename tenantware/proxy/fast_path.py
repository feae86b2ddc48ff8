"""The gateway's default upstream client: plain ``http://`` upstreams on the HTTP/1.1 fast
path (``proxy/http11.py``), everything else (TLS, credentials in the URL) on aiohttp.

The fast path spends a fraction of aiohttp's CPU per call (benchmarks/README.md, "The upstream
fast path"); ``[gateway] upstream_fast_path = false`` sends every call through aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from tenantware.proxy.http11 import Http11UpstreamClient
from tenantware.proxy.upstream import AiohttpUpstreamClient, Timeouts, UpstreamResponse

__all__ = ["FastPathUpstreamClient", "takes_fast_path"]


def takes_fast_path(url: str) -> bool:
    """A plain ``http://`` URL without user information (``user:password@``), in ASCII (aiohttp
    encodes international host names and paths)."""
    if not url.isascii():
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises for a port that is no number
    except ValueError:  # aiohttp reports it
        return False
    return parts.scheme == "http" and bool(parts.hostname) and "@" not in parts.netloc


class FastPathUpstreamClient:
    """Routes each call by its URL; both clients share ``pool_size`` and ``keepalive_s``."""

    def __init__(self, *, pool_size: int = 0, keepalive_s: float = 30.0) -> None:
        self.fast = Http11UpstreamClient(pool_size=pool_size, keepalive_s=keepalive_s)
        self.general = AiohttpUpstreamClient(pool_size=pool_size, keepalive_s=keepalive_s)
        #: Whether each base URL seen takes the fast path (URLs repeat: one check each).
        self._routes: dict[str, bool] = {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        fast = self._routes.get(url)
        if fast is None:
            fast = takes_fast_path(url)
            if len(self._routes) < 1024:
                self._routes[url] = fast
        client = self.fast if fast else self.general
        return await client.request(method, url, headers=headers, body=body, timeouts=timeouts)

    async def aclose(self) -> None:
        try:
            await self.fast.aclose()
        finally:
            await self.general.aclose()
