"""``tenantware serve`` against idle and slow clients: a real server process on loopback.

Idle sockets, slowloris headers, oversized or too many headers and a flood of connections must
not keep real requests from being served. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tenantware.demo import DEMO_KEYS
from tests.servers import find_free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_CONNECTIONS = 8
HEADER_TIMEOUT_S = 1
KEEP_ALIVE_S = 1
#: A generous bound for "the server closed it": many times the configured timeouts.
CLOSE_WITHIN_S = 15.0


@contextlib.contextmanager
def _serve(
    workdir: Path, options: list[str], *, max_open_files: int | None = None
) -> Iterator[tuple[str, int]]:
    """``tenantware serve --demo`` in a subprocess; its base URL and port once healthy."""
    port = find_free_port()
    command = [sys.executable, "-m", "tenantware.cli", "serve", "--demo", "--port", str(port)]
    command += ["--log-format", "console", *options]

    def limit_open_files() -> None:
        if max_open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_open_files,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            if process.poll() is not None:
                pytest.fail(f"tenantware serve exited: {log_path.read_text()}")
            assert time.monotonic() < deadline, "tenantware serve did not become healthy"
            time.sleep(0.1)
        yield base, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Small limits, so each one is reached at once."""
    options = [
        "--header-timeout",
        str(HEADER_TIMEOUT_S),
        "--keep-alive-timeout",
        str(KEEP_ALIVE_S),
        "--max-header-bytes",
        "8192",
        "--max-headers",
        "20",
        "--max-connections",
        str(MAX_CONNECTIONS),
    ]
    with _serve(tmp_path_factory.mktemp("serve"), options) as served:
        yield served


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN_S)
    sock.settimeout(CLOSE_WITHIN_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the timeout)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _chat(base: str) -> httpx.Response:
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {DEMO_KEYS['acme']}"}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def _error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_a_silent_connection_is_closed_after_the_header_timeout(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        assert _read_until_closed(sock) == b""


def test_slowloris_headers_get_408_and_the_connection_closed(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        answer = b""
        for _ in range(int(CLOSE_WITHIN_S / 0.2)):  # one header byte every 0.2 s, bounded
            try:
                sock.sendall(b"x")
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
    status, error = _error(answer)
    assert status == 408
    assert error["code"] == "request_timeout"


def test_an_idle_kept_alive_connection_is_closed(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200")


def test_oversized_headers_get_431(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 16384)
        answer = _read_until_closed(sock)
    status, error = _error(answer)
    assert status == 431
    assert error["code"] == "request_headers_too_large"


def test_a_header_that_never_ends_is_not_read_whole(server: tuple[str, int]) -> None:
    """The server stops reading at the limit and closes: sending the rest fails."""
    _, port = server
    limit = 64 * 1024 * 1024  # far beyond any socket buffers; the server must cut it off
    sent = 0
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: ")
        with contextlib.suppress(OSError):
            while sent < limit:
                sock.sendall(b"a" * 65536)
                sent += 65536
    assert sent < limit


def test_too_many_headers_get_431(server: tuple[str, int]) -> None:
    _, port = server
    headers = b"".join(b"x-h%d: 1\r\n" % index for index in range(30))
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n" + headers + b"\r\n")
        answer = _read_until_closed(sock)
    status, error = _error(answer)
    assert status == 431
    assert error["code"] == "too_many_request_headers"


def test_a_malformed_request_gets_an_openai_shaped_400(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n")
        answer = _read_until_closed(sock)
    status, error = _error(answer)
    assert status == 400
    assert error["type"] == "invalid_request_error"


def test_idle_sockets_over_the_connection_limit_do_not_starve_real_requests(
    server: tuple[str, int],
) -> None:
    base, port = server
    idle = [_connect(port) for _ in range(MAX_CONNECTIONS * 4)]
    try:
        for _ in range(3):
            response = _chat(base)
            assert response.status_code == 200, response.text
        # The oldest idle sockets made room: the server closed them.
        closed = sum(_read_until_closed(sock) == b"" for sock in idle[:MAX_CONNECTIONS])
        assert closed == MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()


def test_more_idle_sockets_than_open_files_do_not_starve_real_requests(tmp_path: Path) -> None:
    """The default limits, with a server allowed only 256 open files and 300 idle sockets:
    the connection cap stays below the file limit, so the server can still accept."""
    with _serve(tmp_path, [], max_open_files=256) as (base, port):
        idle = []
        try:
            for _ in range(300):
                idle.append(_connect(port))
            for _ in range(3):
                response = _chat(base)
                assert response.status_code == 200, response.text
        finally:
            for sock in idle:
                sock.close()
