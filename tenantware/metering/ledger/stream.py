"""Optional publishing of every usage record to a Redis Stream for other systems to consume.

Published after the record is durable in the ledger, one pipelined ``XADD`` per batch with an
approximate ``MAXLEN`` so the stream stays bounded. The ledger is the system of record: a
batch that cannot be published (Redis down) is logged and counted, not retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tenantware.metering.ledger.record import UsageRecord, encode_record

if TYPE_CHECKING:  # the redis package loads only when a Redis URL is used
    from tenantware.backends.redis_support import RedisClient

__all__ = ["RedisStreamPublisher"]


class RedisStreamPublisher:
    """``XADD <prefix><stream> MAXLEN ~ n * record <json> tenant <id>`` per record."""

    def __init__(self, redis: RedisClient, stream: str, *, maxlen: int = 1_000_000) -> None:
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen

    async def publish(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.xadd(
                    self.stream,
                    {"record": encode_record(record), "tenant": record.tenant},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()
