"""A local file that keeps usage records while the ledger is unreachable.

One JSON record per line, appended and fsynced; replayed into the ledger when it is back, then
truncated. A crash between the replay and the truncation replays the same records again, which
the ledger ignores (idempotent on ``record_id``): none are lost and none are counted twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from tenantware.metering.ledger.record import UsageRecord, decode_record, encode_record

__all__ = ["SpillFile"]


class SpillFile:
    """Blocking file operations: the writer calls them from a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(encode_record(r) + b"\n" for r in records)
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> list[UsageRecord]:
        """Every complete record in the file (a torn last line from a crash is skipped)."""
        return self.read_all()[0]

    def read_all(self) -> tuple[list[UsageRecord], list[bytes]]:
        """``(records, bad lines)``: a complete line that does not decode is returned for the
        dead-letter file; a torn last line (a crash mid-append, never fsynced) is skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], []
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a torn line
        records = []
        bad = []
        for line in lines:
            if line:
                try:
                    records.append(decode_record(line))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    bad.append(line)
        return records, bad

    def has_records(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
