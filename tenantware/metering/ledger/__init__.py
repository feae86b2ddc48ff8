"""Usage ledgers: the record, the protocol, SQLite/PostgreSQL/memory backends, the writer."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tenantware.metering.ledger.auditlog import AuditFilter, AuditLog
from tenantware.metering.ledger.base import Ledger, LedgerRejected, LedgerUnavailable, MemoryLedger
from tenantware.metering.ledger.deadletter import DeadLetter, DeadLetterFile, dead_letter_path
from tenantware.metering.ledger.journal import BalanceJournal, JournalEntry, RedemptionCode
from tenantware.metering.ledger.record import COLUMNS, UsageRecord, decode_record, encode_record
from tenantware.metering.ledger.spill import SpillFile
from tenantware.metering.ledger.sqlite import SqliteLedger
from tenantware.metering.ledger.stream import RedisStreamPublisher
from tenantware.metering.ledger.writer import LedgerHealth, LedgerWriter, WriterStats

__all__ = [
    "COLUMNS",
    "DEFAULT_LEDGER_URL",
    "AuditFilter",
    "AuditLog",
    "BalanceJournal",
    "DeadLetter",
    "DeadLetterFile",
    "JournalEntry",
    "Ledger",
    "LedgerHealth",
    "LedgerRejected",
    "LedgerUnavailable",
    "LedgerWriter",
    "MemoryLedger",
    "RedemptionCode",
    "RedisStreamPublisher",
    "SpillFile",
    "SqliteLedger",
    "UsageRecord",
    "WriterStats",
    "dead_letter_path",
    "decode_record",
    "default_spill_path",
    "encode_record",
    "open_ledger",
]

DEFAULT_LEDGER_URL = "sqlite:///tenantware-ledger.db"


def open_ledger(url: str) -> Ledger:
    """A ledger for ``memory://``, ``sqlite:///relative.db`` / ``sqlite:////abs.db`` or
    ``postgresql://...`` (``?schema=name`` picks the schema, default ``public``)."""
    if url.startswith("memory:"):
        return MemoryLedger()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise ValueError(f"ledger url {url!r}: use sqlite:///file.db or sqlite:////abs.db")
        return SqliteLedger(path[1:])
    if url.startswith(("postgresql://", "postgres://")):
        from tenantware.metering.ledger.postgres import PostgresLedger

        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        schema = next((v for k, v in query if k == "schema"), "public")
        rest = urlencode([(k, v) for k, v in query if k != "schema"])
        return PostgresLedger(urlunsplit(parts._replace(query=rest)), schema=schema)
    raise ValueError(f"unsupported ledger url {url!r} (memory://, sqlite:///..., postgresql://...)")


def default_spill_path(ledger: Ledger) -> Path:
    """Next to the SQLite file, else ``tenantware-ledger.spill.jsonl`` in the working dir."""
    if isinstance(ledger, SqliteLedger):
        return ledger.path.with_name(ledger.path.name + ".spill.jsonl")
    return Path("tenantware-ledger.spill.jsonl")
