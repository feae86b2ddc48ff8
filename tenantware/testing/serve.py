"""Serve any ASGI app on a loopback port from a background thread, for tests and benchmarks.

In-process transports buffer whole responses and never drop a connection, so streaming,
disconnect and real-SDK tests need a real socket. Running uvicorn in a thread keeps the app in
the test's process, so the test can still inspect and reconfigure it while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from tenantware.types import ASGIApp

__all__ = ["serve_in_thread"]


@contextlib.contextmanager
def serve_in_thread(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout_s: float = 10.0,
    **uvicorn_options: Any,
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread; yield its base URL (``http://host:port``).

    ``port=0`` lets the kernel pick a free port. ``uvicorn_options`` go to ``uvicorn.Config``
    and override the defaults here (asyncio loop, lifespan off, warnings only, no access log).
    On exit the server stops accepting, closes idle connections at once, gives a response
    still running up to ``timeout_graceful_shutdown`` seconds, and the thread is joined.
    """
    options: dict[str, Any] = {
        "loop": "asyncio",
        "lifespan": "off",
        "log_level": "warning",
        "access_log": False,
        # A stream still open at exit must not hold the test run hostage.
        "timeout_graceful_shutdown": 5,
    }
    options.update(uvicorn_options)
    server = _PromptServer(uvicorn.Config(app, host=host, port=port, **options))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    try:
        bound_port = _wait_until_listening(server, thread, startup_timeout_s)
        shown_host = f"[{host}]" if ":" in host else host
        yield f"http://{shown_host}:{bound_port}"
    finally:
        server.stop()
        thread.join((options["timeout_graceful_shutdown"] or 0) + 5.0)


class _PromptServer(uvicorn.Server):
    """uvicorn's server, stopped as soon as it is asked rather than on its schedule.

    uvicorn notices ``should_exit`` on its next tick (0.1 s) and pauses 0.1 s after asking
    its connections to close, then checks them every 0.1 s: a test suite that stops a server
    after each test spent most of that time waiting. Here ``stop`` wakes the loop, and
    shutdown checks every few milliseconds; what it waits for is unchanged (responses still
    running, up to the graceful timeout, then the app's lifespan shutdown).
    """

    _POLL_S = 0.005

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._woken: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def stop(self) -> None:
        """Ask the server to stop (from any thread)."""
        self.should_exit = True
        woken = self._woken
        if woken is not None:
            loop, wake = woken
            with contextlib.suppress(RuntimeError):  # its loop has already ended
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        wake = asyncio.Event()
        self._woken = (asyncio.get_running_loop(), wake)
        counter = 0
        while not await self.on_tick(counter):  # the date header, ``should_exit``
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await wake.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()  # an idle one closes now, a busy one after its response
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                # uvicorn signals no "last connection closed": polled, as uvicorn does.
                while state.connections or state.tasks:  # noqa: ASYNC110
                    await asyncio.sleep(self._POLL_S)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            for task in state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        await self.lifespan.shutdown()


def _wait_until_listening(server: uvicorn.Server, thread: threading.Thread, timeout: float) -> int:
    """Return the bound port once a TCP connect succeeds; raise if the thread dies or stalls.

    A bare connect (no HTTP request) proves readiness for any app without touching its routes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if server.started:
            sockets = [sock for srv in server.servers for sock in (srv.sockets or ())]
            host, port = sockets[0].getsockname()[:2]
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
                return int(port)
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see its log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {timeout} s")
        time.sleep(0.005)
