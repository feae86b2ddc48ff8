"""A local file for usage records that a ledger will never take, so they never block others.

A record the ledger refuses (a value out of its range, a constraint) would otherwise be
retried forever at the head of the queue, and every record behind it would wait. It is set
aside here instead, one JSON line each with the reason, fsynced: an operator can fix and
re-import it (``record`` is the record as the spill file holds it; ``line`` the raw text of a
spill line that did not even decode).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from tenantware.metering.ledger.record import UsageRecord

__all__ = ["DeadLetter", "DeadLetterFile", "dead_letter_path", "letters_for"]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the dead-letter file."""

    #: Unix time the record was set aside.
    at: float
    reason: str
    record: UsageRecord | None = None
    #: A spill line that did not decode, as text (bytes that are not UTF-8 escaped).
    line: str | None = None


_encode = msgspec.json.Encoder().encode
_decode_lines = msgspec.json.Decoder(DeadLetter).decode_lines


def dead_letter_path(spill_path: Path) -> Path:
    """``usage.db.spill.jsonl`` -> ``usage.db.dead.jsonl``; other names get ``.dead.jsonl``."""
    name = spill_path.name
    stem = name[: -len(".spill.jsonl")] if name.endswith(".spill.jsonl") else spill_path.stem
    return spill_path.with_name(stem + ".dead.jsonl")


class DeadLetterFile:
    """Blocking file operations: the writer calls them from a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(_encode(letter) + b"\n" for letter in letters)
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> list[DeadLetter]:
        try:
            return _decode_lines(self.path.read_bytes())
        except FileNotFoundError:
            return []


def letters_for(
    records: Sequence[UsageRecord], reason: str, lines: Sequence[bytes] = ()
) -> list[DeadLetter]:
    """Dead letters for refused ``records`` and undecodable spill ``lines``."""
    now = time.time()
    letters = [DeadLetter(at=now, reason=reason, record=r) for r in records]
    letters.extend(
        DeadLetter(at=now, reason=reason, line=line.decode("utf-8", "backslashreplace"))
        for line in lines
    )
    return letters
