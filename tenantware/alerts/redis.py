"""Alert state in Redis, shared by every replica under one prefix.

All keys share the hash tag ``{tw:alerts}`` (one slot on a cluster). Window counts are one
hash per bucket (``rule\\x1fgroup`` -> judged, ``...\\x1fbad`` -> bad), added with HINCRBY and
expiring after the longest window; facts are one hash of replica -> ``[at, facts]``; the
lease is a key set only by ``lua/lease.lua``; active alerts a hash; the history a capped
list; tenants' registered webhooks a hash. redis-py errors become ``StoreUnavailable``
(``redis_errors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

import msgspec

from tenantware.alerts.memory import earliest
from tenantware.alerts.model import Alert, AlertEvent, TenantWebhook
from tenantware.alerts.window import Counts
from tenantware.backends.redis_support import RedisClient, redis_errors

__all__ = ["RedisAlertStore"]

_LEASE = resources.files("tenantware.alerts").joinpath("lua/lease.lua").read_text()
_RELEASE = resources.files("tenantware.alerts").joinpath("lua/release.lua").read_text()
_SEP = "\x1f"
_encode = msgspec.json.encode
_alert = msgspec.json.Decoder(Alert)
_event = msgspec.json.Decoder(AlertEvent)
_webhook = msgspec.json.Decoder(TenantWebhook)
_facts = msgspec.json.Decoder(tuple[float, dict[str, float]])


class RedisAlertStore:
    shared = True

    def __init__(self, redis: RedisClient, *, prefix: str = "") -> None:
        self.redis = redis
        base = f"{prefix}tw:{{tw:alerts}}:"
        self._bucket = base + "w:"
        self._facts_key = base + "facts"
        self._lease_key = base + "lease"
        self._active_key = base + "active"
        self._history_key = base + "history"
        self._webhooks_key = base + "webhooks"
        self._lease: Any = redis.register_script(_LEASE)
        self._release: Any = redis.register_script(_RELEASE)

    async def add_counts(self, counts: Counts, *, oldest_bucket: int, ttl_s: float) -> None:
        if not counts:
            return
        ttl = max(1, int(ttl_s) + 1)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                buckets: set[int] = set()
                for (rule, group, bucket), (judged, bad) in counts.items():
                    key = self._bucket + str(bucket)
                    field = rule + _SEP + group
                    pipe.hincrby(key, field, judged)
                    if bad:
                        pipe.hincrby(key, field + _SEP + "bad", bad)
                    buckets.add(bucket)
                for bucket in buckets:
                    pipe.expire(self._bucket + str(bucket), ttl)
                await pipe.execute()

    async def read_counts(self, first_bucket: int, last_bucket: int) -> Counts:
        buckets = range(first_bucket, last_bucket + 1)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket in buckets:
                    pipe.hgetall(self._bucket + str(bucket))
                replies = await pipe.execute()
        counts: Counts = {}
        for bucket, reply in zip(buckets, replies, strict=True):
            for raw_field, raw_value in reply.items():
                field = _text(raw_field)
                rule, _, rest = field.partition(_SEP)
                group, _, bad = rest.partition(_SEP)
                entry = counts.setdefault((rule, group, bucket), [0, 0])
                entry[1 if bad else 0] += int(raw_value)
        return counts

    async def report_facts(self, replica: str, facts: Mapping[str, float], now: float) -> None:
        with redis_errors():
            await self.redis.hset(self._facts_key, replica, _encode((now, dict(facts))))

    async def facts(self, now: float, max_age_s: float) -> dict[str, float]:
        with redis_errors():
            reply = await self.redis.hgetall(self._facts_key)
        fresh: list[dict[str, float]] = []
        stale: list[Any] = []
        for replica, raw in reply.items():
            at, found = _facts.decode(raw)
            if now - at <= max_age_s:
                fresh.append(found)
            elif now - at > 10 * max_age_s:
                stale.append(replica)
        if stale:
            with redis_errors():
                await self.redis.hdel(self._facts_key, *stale)
        return earliest(fresh)

    async def acquire(self, holder: str, ttl_s: float) -> bool:
        with redis_errors():
            held = await self._lease(keys=[self._lease_key], args=[holder, int(ttl_s * 1000)])
        return bool(held)

    async def release(self, holder: str) -> None:
        with redis_errors():
            await self._release(keys=[self._lease_key], args=[holder])

    async def active(self) -> dict[str, Alert]:
        with redis_errors():
            reply = await self.redis.hgetall(self._active_key)
        return {_text(key): _alert.decode(raw) for key, raw in reply.items()}

    async def set_active(self, alert: Alert) -> None:
        with redis_errors():
            await self.redis.hset(self._active_key, alert.fingerprint, _encode(alert))

    async def clear_active(self, fingerprint: str) -> None:
        with redis_errors():
            await self.redis.hdel(self._active_key, fingerprint)

    async def record(self, event: AlertEvent, keep: int) -> None:
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(self._history_key, _encode(event))
                pipe.ltrim(self._history_key, 0, keep - 1)
                await pipe.execute()

    async def history(self, limit: int) -> list[AlertEvent]:
        with redis_errors():
            reply = await self.redis.lrange(self._history_key, 0, limit - 1)
        return [_event.decode(raw) for raw in reply]

    async def webhooks(self) -> list[TenantWebhook]:
        with redis_errors():
            reply = await self.redis.hgetall(self._webhooks_key)
        return [_webhook.decode(raw) for raw in reply.values()]

    async def put_webhook(self, webhook: TenantWebhook) -> None:
        with redis_errors():
            await self.redis.hset(self._webhooks_key, webhook.id, _encode(webhook))

    async def delete_webhook(self, webhook_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.hdel(self._webhooks_key, webhook_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
