"""Config reload without restart: on SIGHUP or when the file changes on disk.

A new file is validated whole before it replaces the running config; a bad one is logged and
the old config keeps serving.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import anyio
import structlog

from tenantware.config import ConfigError, load_config
from tenantware.state import LiveConfig

__all__ = ["reload_from", "watch_config"]

log = structlog.get_logger("tenantware.reload")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def reload_from(live: LiveConfig, path: str | os.PathLike[str]) -> bool:
    """Load ``path`` into ``live``; ``False`` (old config kept, error logged) if it is bad."""
    try:
        snapshot = live.replace(load_config(path))
    except ConfigError as exc:
        log.error("config reload rejected; keeping the running config", error=str(exc))
        return False
    log.info("config reloaded", path=str(path), version=snapshot.version)
    return True


async def watch_config(
    live: LiveConfig, path: str | os.PathLike[str], *, interval_s: float = 1.0
) -> None:
    """Run until cancelled: reload on file change (polled) and on SIGHUP (main thread only)."""
    file = Path(path)
    async with anyio.create_task_group() as group:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            group.start_soon(_on_sighup, live, file)
        last = _stamp(file)
        while True:
            await anyio.sleep(interval_s)
            stamp = _stamp(file)
            if stamp is not None and stamp != last:
                last = stamp
                reload_from(live, file)


async def _on_sighup(live: LiveConfig, file: Path) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            reload_from(live, file)
