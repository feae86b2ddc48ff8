"""The batching ledger writer: the request path hands records over, never waits on storage.

``submit`` appends to an in-memory deque (no I/O, no await). A background task flushes every
``flush_interval_s`` in batches of ``batch_size``; what the ledger cannot take stays buffered
(up to ``max_buffered``) and beyond that is spilled to a local file, replayed when the ledger
answers again. Leaving ``running()`` flushes everything (or spills it if the ledger is down),
so a graceful shutdown loses nothing; a hard kill loses at most the last interval's records.

A record the ledger refuses for good (``LedgerRejected``: a value out of its range, a
constraint) must not block the records behind it: the failed batch is split in halves until
the culprits are alone, and those go to the dead-letter file with the reason; the spill replay
does the same. Any other error counts as the ledger being unavailable: retried, never a reason
to set records aside. A ledger that keeps failing while records wait is "stuck":
``health()`` says so (for ``/readyz``), the ``tenantware_ledger_*`` gauges show it, and a log
line repeats every ``stuck_log_interval_s`` while it lasts.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import structlog

from tenantware.metering.ledger.base import Ledger, LedgerRejected
from tenantware.metering.ledger.deadletter import DeadLetterFile, dead_letter_path, letters_for
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.ledger.spill import SpillFile
from tenantware.metering.ledger.stream import RedisStreamPublisher
from tenantware.metrics import LEDGER_DEAD_LETTERS, LEDGER_FAILING_SECONDS, LEDGER_STUCK

__all__ = ["LedgerHealth", "LedgerWriter", "WriterStats"]

log = structlog.get_logger("tenantware.metering.ledger")

#: Called with each batch of fresh records, off the request path (metrics, the request log).
Observer = Callable[[Sequence[UsageRecord]], None]
#: Records handed to the observers at a time: small enough that a request waits little.
_OBSERVE_SLICE = 16
#: How often a flush looks for a spill file it does not know of (another process's, or one
#: left by a previous run): a thread hop per flush would cost the loop more than the look.
_SPILL_LOOK_S = 1.0


class WriterStats:
    """Counters a test or an operator can read."""

    __slots__ = (
        "dead_lettered",
        "dropped",
        "failures",
        "published",
        "spilled",
        "submitted",
        "written",
    )

    def __init__(self) -> None:
        self.submitted = 0
        self.written = 0
        self.spilled = 0
        self.failures = 0
        self.published = 0
        self.dropped = 0
        #: Records (or spill lines) the ledger refused for good, set aside.
        self.dead_lettered = 0


class LedgerHealth(msgspec.Struct, frozen=True, kw_only=True):
    """What ``/readyz`` reports about the ledger."""

    #: ``sqlite``, ``postgresql``, ``memory``... (never a URL: it may hold a password).
    ledger: str
    stuck: bool
    #: Seconds writes have been failing (0 while the ledger takes them).
    failing_s: float
    #: Records waiting in memory for the ledger, and whether some wait in the spill file.
    pending: int
    spilled: bool
    #: The type of the last write error, while failing (the logs have the message).
    error: str | None = None


class LedgerWriter:
    """``writer = LedgerWriter(ledger)``; ``async with writer.running(): ...``."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        flush_interval_s: float = 0.1,
        batch_size: int = 1000,
        max_buffered: int = 50_000,
        spill: SpillFile | None = None,
        publisher: RedisStreamPublisher | None = None,
        observers: Sequence[Observer] = (),
        retry_backoff_s: float = 1.0,
        dead_letter: DeadLetterFile | None = None,
        stuck_after_s: float | None = None,
        stuck_log_interval_s: float = 30.0,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.ledger = ledger
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self.spill = spill
        #: Next to the spill file unless given; without either, refused records are logged
        #: and dropped (a memory ledger in tests).
        if dead_letter is None and spill is not None:
            dead_letter = DeadLetterFile(dead_letter_path(spill.path))
        self.dead_letter = dead_letter
        self.publisher = publisher
        self.observers = list(observers)
        self.retry_backoff_s = retry_backoff_s
        #: Failing this long with records waiting is "stuck": a few retries, not one blip.
        self.stuck_after_s = (
            stuck_after_s
            if stuck_after_s is not None
            else 3 * max(flush_interval_s, retry_backoff_s)
        )
        self.stuck_log_interval_s = stuck_log_interval_s
        self._clock = clock
        self.stats = WriterStats()
        self._fresh: deque[UsageRecord] = deque()
        self._unwritten: list[UsageRecord] = []
        self._running = False
        self._healthy = True
        self._retry_at = 0.0
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._spill_waiting = False
        self._spill_looked_at: float | None = None
        self._stuck_logged_at: float | None = None
        self._flushing = anyio.Lock()

    # -- request path -----------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Queue ``record``; O(1), never blocks. Without a running writer (no lifespan), the
        queue is bounded by ``max_buffered`` and the oldest records beyond it are dropped."""
        self._fresh.append(record)
        self.stats.submitted += 1
        if not self._running and len(self._fresh) > self.max_buffered:
            self._fresh.popleft()
            self.stats.dropped += 1

    @property
    def pending(self) -> int:
        """Records accepted but not yet in the ledger (spilled ones excluded)."""
        return len(self._fresh) + len(self._unwritten)

    def health(self) -> LedgerHealth:
        """Whether the ledger is stuck: failing for ``stuck_after_s`` with records waiting."""
        since = self._failing_since
        failing_s = max(0.0, self._clock() - since) if since is not None else 0.0
        pending = self.pending
        waiting = pending > 0 or self._spill_waiting
        return LedgerHealth(
            ledger=type(self.ledger).__name__.removesuffix("Ledger").lower() or "custom",
            stuck=since is not None and waiting and failing_s >= self.stuck_after_s,
            failing_s=round(failing_s, 3),
            pending=pending,
            spilled=self._spill_waiting,
            error=self._last_error if since is not None else None,
        )

    def watch_health(self) -> LedgerHealth:
        """Update the ledger gauges and, while stuck, log at most every
        ``stuck_log_interval_s``; the background loop calls it after every flush."""
        health = self.health()
        LEDGER_STUCK.set(1 if health.stuck else 0)
        LEDGER_FAILING_SECONDS.set(health.failing_s if health.pending or health.spilled else 0)
        now = self._clock()
        if health.stuck:
            last = self._stuck_logged_at
            if last is None or now - last >= self.stuck_log_interval_s:
                self._stuck_logged_at = now
                log.error(
                    "usage ledger stuck",
                    ledger=health.ledger,
                    failing_s=health.failing_s,
                    pending=health.pending,
                    spilled=health.spilled,
                    error=health.error,
                )
        elif self._stuck_logged_at is not None:
            self._stuck_logged_at = None
            log.info("usage ledger no longer stuck", ledger=health.ledger)
        return health

    # -- background -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LedgerWriter]:
        """Open the ledger, flush in the background, flush everything on exit."""
        try:
            await self.ledger.open()
        except Exception as exc:  # the ledger may be down at start: buffer and retry
            self._mark_failed(exc)
        self._running = True
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._loop)
                try:
                    yield self
                finally:
                    group.cancel_scope.cancel()
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):
                await self.drain()
                await self.ledger.aclose()

    async def _loop(self) -> None:
        # Fixed cadence (not "sleep after each flush"), so a record waits at most one
        # interval for the flush that writes it, however long the writes take.
        interval = self.flush_interval_s
        tick = anyio.current_time()
        while True:
            tick += interval
            await anyio.sleep_until(tick)
            try:
                await self.flush()
            except Exception:  # never let one bad flush stop metering: records stay queued
                log.exception("usage ledger flush failed")
            self.watch_health()
            now = anyio.current_time()
            if now > tick + interval:
                tick = now  # fell behind (ledger slow or down): do not burst to catch up

    async def flush(self) -> None:
        """Hand fresh records to observers, write what the ledger takes, spill overflow."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        taken = self._take_fresh()
        if taken and self.observers:
            # Metrics and log lines for a big batch take a while: done on the loop in small
            # slices with a checkpoint between them, so a request waits at most one slice (a
            # worker thread would hold the GIL for a whole switch interval at a time).
            for start in range(0, len(taken), _OBSERVE_SLICE):
                self._observe(taken[start : start + _OBSERVE_SLICE])
                await anyio.lowlevel.checkpoint()
        if not self._healthy and self._clock() < self._retry_at:
            await self._spill_overflow()
            return
        spilled = await self._spill_has_records()
        if spilled and not await self._replay_spill():
            await self._spill_overflow()
            return
        while self._unwritten:
            batch = self._unwritten[: self.batch_size]
            if not await self._write(batch):
                break
            del self._unwritten[: len(batch)]
        await self._spill_overflow()

    async def _spill_has_records(self) -> bool:
        """Whether the spill file holds records: known when this writer spilled them, looked
        up on disk at most every ``_SPILL_LOOK_S`` (and at the first flush) otherwise."""
        if self.spill is None:
            return False
        if not self._spill_waiting:
            now = self._clock()
            looked = self._spill_looked_at
            if looked is not None and now - looked < _SPILL_LOOK_S:
                return False
            self._spill_looked_at = now
        self._spill_waiting = await anyio.to_thread.run_sync(self.spill.has_records)
        return self._spill_waiting

    async def drain(self) -> None:
        """Write everything pending; what the ledger refuses goes to the spill file."""
        async with self._flushing:
            self._healthy = True
            self._spill_looked_at = None  # look on disk: a drain leaves nothing behind
            await self._flush()
            if self._unwritten and self.spill is not None:
                await self._spill(self._unwritten)

    def _take_fresh(self) -> list[UsageRecord]:
        fresh = self._fresh
        if not fresh:
            return []
        taken = [fresh.popleft() for _ in range(len(fresh))]
        self._unwritten.extend(taken)
        return taken

    def _observe(self, records: list[UsageRecord]) -> None:
        for observer in self.observers:
            try:
                observer(records)
            except Exception:
                log.exception("usage observer failed")

    async def _write(self, batch: list[UsageRecord]) -> bool:
        """``False`` when the ledger is unavailable (the batch stays queued); records it
        refuses for good are set aside, so the batch is then done."""
        try:
            await self.ledger.write(batch)
        except LedgerRejected as exc:
            # Some record of the batch is refused: halve until the culprits stand alone.
            if len(batch) == 1:
                await self._set_aside(batch, [], exc)
                return True
            middle = len(batch) // 2
            return await self._write(batch[:middle]) and await self._write(batch[middle:])
        except Exception as exc:  # unavailable (or a fault of the ledger, not of the records)
            self._mark_failed(exc)
            return False
        if not self._healthy:
            log.info("ledger reachable again")
        self._healthy = True
        self._failing_since = None
        self._last_error = None
        self.stats.written += len(batch)
        if self.publisher is not None:
            try:
                await self.publisher.publish(batch)
                self.stats.published += len(batch)
            except Exception as exc:
                log.warning("usage stream publish failed", error=repr(exc), records=len(batch))
        return True

    def _mark_failed(self, exc: BaseException) -> None:
        self.stats.failures += 1
        if self._healthy:
            log.warning("ledger unavailable; buffering records", error=repr(exc))
        self._healthy = False
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        # The type only: /readyz shows it without a key, and a driver's message may quote
        # a connection string.
        self._last_error = type(exc).__name__
        self._retry_at = now + self.retry_backoff_s

    async def _set_aside(
        self, records: list[UsageRecord], lines: list[bytes], exc: BaseException
    ) -> None:
        """Put what the ledger refuses for good in the dead-letter file (else log it)."""
        count = len(records) + len(lines)
        self.stats.dead_lettered += count
        LEDGER_DEAD_LETTERS.inc(count)
        reason = repr(exc)
        ids = [r.record_id for r in records]
        if self.dead_letter is None:
            log.error("usage records refused by the ledger; dropped", reason=reason, ids=ids)
            return
        letters = letters_for(records, reason, lines)
        try:
            await anyio.to_thread.run_sync(self.dead_letter.append, letters)
        except OSError as error:
            log.error(
                "usage records refused by the ledger; dead-letter file not writable",
                reason=reason,
                ids=ids,
                path=str(self.dead_letter.path),
                error=repr(error),
            )
            return
        log.error(
            "usage records refused by the ledger; set aside",
            reason=reason,
            ids=ids,
            lines=len(lines),
            path=str(self.dead_letter.path),
        )

    async def _replay_spill(self) -> bool:
        assert self.spill is not None
        records, bad = await anyio.to_thread.run_sync(self.spill.read_all)
        for start in range(0, len(records), self.batch_size):
            if not await self._write(records[start : start + self.batch_size]):
                return False
        if bad:
            await self._set_aside([], bad, ValueError("spill line is not a usage record"))
        await anyio.to_thread.run_sync(self.spill.clear)
        self._spill_waiting = False
        if records:
            log.info("spilled usage records replayed", records=len(records))
        return True

    async def _spill_overflow(self) -> None:
        if len(self._unwritten) > self.max_buffered and self.spill is not None:
            await self._spill(self._unwritten)

    async def _spill(self, records: list[UsageRecord]) -> None:
        assert self.spill is not None
        batch = list(records)
        try:
            await anyio.to_thread.run_sync(self.spill.append, batch)
        except OSError as exc:  # disk full, read-only: keep them in memory, try again later
            log.error("usage spill file not writable", path=str(self.spill.path), error=repr(exc))
            return
        self.stats.spilled += len(batch)
        self._spill_waiting = True
        del records[: len(batch)]
