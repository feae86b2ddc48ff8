"""Log output for the ``tenantware`` command: one JSON line per event, rendered with msgspec.

The library itself never configures structlog (an app that embeds the middlewares owns its
logging); the command line is an application, so it does, once per process. The per-request
lines (``tenantware.metering.telemetry.log_records``) come in batches of hundreds a second:
where this module owns the output they skip structlog's per-event processing and go out
rendered in one write per batch, the same JSON as structlog would give.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Iterable
from typing import Any, BinaryIO

import msgspec
import structlog

__all__ = ["BulkJsonSink", "bulk_sink", "configure_json_logging"]

_encoder = msgspec.json.Encoder(enc_hook=str)
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines


def _dumps(event: Any, **_: Any) -> bytes:
    return _encode(event)


class BulkJsonSink:
    """Where ``configure_json_logging`` sends its lines, for events logged many at a time."""

    def __init__(self, sink: BinaryIO, level: int) -> None:
        self.sink = sink
        self.level = level

    def info_stamp(self) -> str | None:
        """The ``timestamp`` of an info line written now (``None``: info lines are not
        wanted), as the chain of ``configure_json_logging`` writes it."""
        if self.level > logging.INFO:
            return None
        return dt.datetime.now(tz=dt.UTC).isoformat().replace("+00:00", "Z")

    def write_lines(self, events: Iterable[Any]) -> None:
        """One JSON line per event (a struct or dict holding its ``event``, ``level`` and
        ``timestamp`` last, as structlog's chain adds them), in one write."""
        lines = _encode_lines(events)
        if lines:
            self.sink.write(lines)
            self.sink.flush()


#: The sink, renderer and logger factory of the last ``configure_json_logging``.
_bulk: tuple[BulkJsonSink, Any, Any] | None = None


def bulk_sink() -> BulkJsonSink | None:
    """The sink of ``configure_json_logging`` while structlog still renders with it
    (``None`` once anything else configured structlog, ``capture_logs`` included)."""
    if _bulk is None:
        return None
    sink, renderer, factory = _bulk
    config = structlog.get_config()
    processors = config["processors"]
    if config["logger_factory"] is not factory or not processors or processors[-1] is not renderer:
        return None
    return sink


def configure_json_logging(sink: BinaryIO | None = None, *, level: int = logging.INFO) -> None:
    """Render every structlog event as one JSON line (level, UTC timestamp, and the
    exception's traceback text when there is one) on ``sink``."""
    global _bulk
    sink = sink or sys.stdout.buffer
    renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    factory = structlog.BytesLoggerFactory(sink)
    _bulk = (BulkJsonSink(sink, level), renderer, factory)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # ``log.exception(...)`` / ``exc_info``: the traceback as text under ``exception``
            # (its last line is the error's type and message). Text, not structlog's dict
            # tracebacks, whose frames can carry local variables (keys, request bodies).
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
