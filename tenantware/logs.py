"""Log output for the ``tenantware`` command: one JSON line per event, rendered with msgspec.

The library itself never configures structlog (an app that embeds the middlewares owns its
logging); the command line is an application, so it does, once per process.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, BinaryIO

import msgspec
import structlog

__all__ = ["configure_json_logging"]

_encode = msgspec.json.Encoder(enc_hook=str).encode


def _dumps(event: Any, **_: Any) -> bytes:
    return _encode(event)


def configure_json_logging(sink: BinaryIO | None = None, *, level: int = logging.INFO) -> None:
    """Render every structlog event as one JSON line (level, UTC timestamp) on ``sink``."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(sink or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
