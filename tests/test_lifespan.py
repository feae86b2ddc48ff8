"""The gateway's lifespan: each phase's failure reported as that phase's, with the real error;
process-wide tuning only in ``tenantware serve``, never in a lifespan inside a user's app."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tenantware import Gateway
from tenantware.cli import GIL_SWITCH_INTERVAL_S
from tenantware.types import Message
from tests.support import make_config

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DEFAULT_SWITCH_INTERVAL_S = 0.005


async def _run_lifespan(gateway: Gateway) -> list[Message]:
    """Drive the standalone app's lifespan through startup and shutdown; what it sent."""
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    await gateway.asgi_app()({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


@pytest.fixture
def default_switch_interval() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(PYTHON_DEFAULT_SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.usefixtures("default_switch_interval")
async def test_the_gateway_lifespan_leaves_process_settings_alone() -> None:
    gateway = Gateway(make_config())
    garbage: list[Any] = [[] for _ in range(100)]  # tracked objects a freeze would move
    frozen = gc.get_freeze_count()
    sent = await _run_lifespan(gateway)
    assert [message["type"] for message in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert gc.get_freeze_count() == frozen
    assert sys.getswitchinterval() == PYTHON_DEFAULT_SWITCH_INTERVAL_S
    del garbage


def test_serve_tunes_the_process_once_started(tmp_path: Path) -> None:
    """``build_app`` (what ``tenantware serve`` runs in each worker) freezes the collector and
    shortens the GIL switch interval once its services have started."""
    script = """
import gc, sys
import anyio
sys.setswitchinterval(0.005)
from tenantware.cli import build_app

async def main():
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    async def receive():
        return next(incoming)
    async def send(message):
        if message["type"] == "lifespan.startup.complete":
            print("frozen", gc.get_freeze_count(), "interval", sys.getswitchinterval())
        print(message["type"])
    await build_app()({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

anyio.run(main)
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "TENANTWARE_DEMO_URL": "http://127.0.0.1:9",
        "TENANTWARE_LOG_FORMAT": "console",
        "TMPDIR": str(tmp_path),  # the demo's ledger directory
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    tuned = lines[0].split()
    assert tuned[0] == "frozen"
    assert int(tuned[1]) > 0
    assert float(tuned[3]) == GIL_SWITCH_INTERVAL_S
    assert lines[1:3] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_a_failed_startup_is_reported_as_such_with_the_error() -> None:
    gateway = Gateway(make_config())

    @asynccontextmanager
    async def unreachable_store() -> AsyncIterator[None]:
        raise ConnectionError("store at 10.0.0.9:6379 refused the connection")
        yield

    gateway.add_service(unreachable_store)
    sent = await _run_lifespan(gateway)
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "ConnectionError: store at 10.0.0.9:6379 refused the connection",
        }
    ]


async def test_a_failed_shutdown_is_reported_as_such_with_the_error() -> None:
    gateway = Gateway(make_config())

    @asynccontextmanager
    async def failing_flush() -> AsyncIterator[None]:
        yield
        raise OSError("ledger disk full")

    gateway.add_service(failing_flush)
    sent = await _run_lifespan(gateway)
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.failed", "message": "OSError: ledger disk full"},
    ]
