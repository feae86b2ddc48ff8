"""The pipelined Redis connection (``MultiplexedRedis``) against a real Redis and dead ends."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import hiredis
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tenantware.backends.multiplex import MultiplexedRedis, encode_command, multiplexable
from tenantware.backends.redis_support import connect_redis, connect_scripts
from tests.servers import find_free_port

pytestmark = pytest.mark.anyio

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"
INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def mux(redis_url: str) -> AsyncIterator[MultiplexedRedis]:
    client = MultiplexedRedis(redis_url, timeout_s=2.0)
    yield client
    await client.aclose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a stalled Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_encodes_commands_as_resp() -> None:
    assert encode_command("SET", b"k", 5, 1.5) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
    )


def test_only_plain_redis_urls_are_multiplexed() -> None:
    assert multiplexable("redis://127.0.0.1:6379/0")
    assert multiplexable("unix:///run/redis.sock")
    assert not multiplexable("rediss://127.0.0.1:6380")
    assert not multiplexable("redis+cluster://127.0.0.1:7000")
    with pytest.raises(ValueError, match="redis://"):
        MultiplexedRedis("rediss://127.0.0.1:6380")


async def test_concurrent_calls_each_get_their_own_reply(
    mux: MultiplexedRedis, redis_prefix: str
) -> None:
    script = mux.register_script(ECHO)

    async def one(i: int) -> list[object]:
        return list(await script(keys=[f"{redis_prefix}k{i}"], args=[f"v{i}", i]))

    replies = await asyncio.gather(*(one(i) for i in range(500)))
    assert replies == [
        [f"{redis_prefix}k{i}".encode(), f"v{i}".encode(), 2 * i] for i in range(500)
    ]


async def test_calls_made_in_one_loop_turn_go_out_in_one_write() -> None:
    """A fake Redis counts its reads: 100 concurrent calls arrive as one batch, not 100."""
    reads: list[int] = []

    class FakeRedis(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.reader = hiredis.Reader()

        def data_received(self, data: bytes) -> None:
            self.reader.feed(data)
            commands = 0
            while self.reader.gets() is not False:
                commands += 1
            reads.append(commands)
            self.transport.write(b":1\r\n" * commands)  # type: ignore[attr-defined]

    server = await asyncio.get_running_loop().create_server(FakeRedis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MultiplexedRedis(f"redis://127.0.0.1:{port}", timeout_s=2.0)
    try:
        await client.execute_command("PING")
        replies = await asyncio.gather(*(client.execute_command("INCR", "k") for _ in range(100)))
        assert replies == [1] * 100
        assert sum(reads) == 101
        assert len(reads) <= 4  # the PING, then the batch (loopback may split a large write)
    finally:
        await client.aclose()
        server.close()


async def test_an_error_reply_fails_only_its_call(mux: MultiplexedRedis, redis_prefix: str) -> None:
    bad = mux.register_script("return redis.call('INCR', KEYS[1], 'extra')")
    good = mux.register_script(ECHO)
    results = await asyncio.gather(
        good(keys=["a"], args=["x", 1]),
        bad(keys=[f"{redis_prefix}x"]),
        good(keys=["b"], args=["y", 2]),
        return_exceptions=True,
    )
    assert results[0] == [b"a", b"x", 2]
    assert isinstance(results[1], ResponseError)
    assert results[2] == [b"b", b"y", 4]


async def test_scripts_survive_a_script_flush(mux: MultiplexedRedis, redis_prefix: str) -> None:
    script = mux.register_script(INCR + " -- " + uuid.uuid4().hex)  # unknown to Redis yet
    assert await script(keys=[f"{redis_prefix}f"], args=[2]) == 2
    await mux.execute_command("SCRIPT", "FLUSH")  # as after a restart: EVALSHA is NOSCRIPT
    assert await script(keys=[f"{redis_prefix}f"], args=[3]) == 5
    assert await mux.execute_command("SCRIPT", "EXISTS", script.sha) == [1]  # EVAL loaded it
    assert await script(keys=[f"{redis_prefix}f"], args=[1]) == 6


async def test_a_cancelled_call_does_not_shift_the_replies(
    mux: MultiplexedRedis, redis_prefix: str
) -> None:
    script = mux.register_script(ECHO)
    await script(keys=["warm"], args=["w", 0])
    task = asyncio.ensure_future(script(keys=["first"], args=["1", 1]))
    await asyncio.sleep(0)
    task.cancel()
    assert await script(keys=["second"], args=["2", 2]) == [b"second", b"2", 4]
    assert task.cancelled()


async def test_a_stalled_server_fails_every_waiting_call_at_the_deadline(
    silent_server: int,
) -> None:
    client = MultiplexedRedis(f"redis://127.0.0.1:{silent_server}", timeout_s=0.1)
    try:
        script = client.register_script(ECHO)
        started = time.monotonic()
        results = await asyncio.gather(
            *(script(keys=["k"], args=["v", i]) for i in range(5)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(result, RedisTimeoutError) for result in results), results
        assert elapsed < 2.0  # bounded by the deadline, not by a socket default
        with pytest.raises(RedisTimeoutError):  # a new connection, the same stalled server
            await script(keys=["k"], args=["v", 9])
    finally:
        await client.aclose()


async def test_an_unreachable_server_fails_fast_then_waits_before_trying_again() -> None:
    client = MultiplexedRedis(f"redis://127.0.0.1:{find_free_port()}", retry_s=30.0)
    try:
        with pytest.raises(RedisConnectionError, match="unreachable: ConnectionRefused"):
            await client.execute_command("PING")
        with pytest.raises(RedisConnectionError, match="retrying shortly"):
            await client.execute_command("PING")
    finally:
        await client.aclose()


async def test_reconnects_after_the_server_drops_the_connection(
    mux: MultiplexedRedis, redis_url: str
) -> None:
    first = await mux.execute_command("CLIENT", "ID")
    with redis.Redis.from_url(redis_url) as admin:
        admin.client_kill_filter(_id=first)
    outcomes = []
    for _ in range(3):  # the first call may still meet the dead socket
        try:
            outcomes.append(await mux.execute_command("CLIENT", "ID"))
        except RedisConnectionError:
            outcomes.append(None)
    assert outcomes[-1] is not None
    assert outcomes[-1] != first
    assert outcomes.count(None) <= 1


def test_works_from_one_event_loop_after_another(redis_url: str) -> None:
    """A gateway object may outlive the loop it first ran on (test runners, reloads)."""
    client = MultiplexedRedis(redis_url, timeout_s=2.0)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(client.execute_command("PING")) == b"PONG"
        assert second.run_until_complete(client.execute_command("PING")) == b"PONG"
        first.run_until_complete(asyncio.sleep(0.01))  # the first loop closes its socket
        second.run_until_complete(client.aclose())
    finally:
        first.close()
        second.close()


async def test_authenticates_and_selects_the_database_of_the_url(redis_url: str) -> None:
    user, password = f"twtest-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    host_port = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    with redis.Redis.from_url(redis_url) as admin:
        try:
            admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+@all"])
        except redis.ResponseError as exc:  # pragma: no cover - a server without ACLs
            pytest.skip(f"this Redis does not take ACL SETUSER: {exc}")
        try:
            client = MultiplexedRedis(f"redis://{user}:{password}@{host_port}/3")
            try:
                info = await client.execute_command("CLIENT", "INFO")
                assert f"user={user}".encode() in info
                assert b" db=3 " in info
            finally:
                await client.aclose()
            wrong = MultiplexedRedis(f"redis://{user}:not-{password}@{host_port}/0")
            with pytest.raises(ResponseError) as refused:
                await wrong.execute_command("PING")
            assert password not in str(refused.value)
            await wrong.aclose()
        finally:
            admin.acl_deluser(user)


async def test_the_gateway_runs_scripts_on_one_pipelined_connection(redis_url: str) -> None:
    client = connect_redis(redis_url)
    try:
        assert isinstance(connect_scripts(redis_url, client), MultiplexedRedis)
        assert connect_scripts("rediss://127.0.0.1:1", client) is client
    finally:
        await client.aclose()


BUSY = """
local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[1])
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us
return 1
"""


async def test_a_deep_pipeline_that_drains_is_not_an_outage() -> None:
    # 200 scripts of 10 ms each (2 s of work) queued at once on a 1 s bound: Redis answers
    # batch after batch (each read of ~16 KB of commands, about 50 ms of work), so the
    # connection keeps making progress and every call is answered; the bound is for silence,
    # not for queueing. (The bound is 20 batches long, so a host that pauses Redis for a
    # moment does not make a real silence of it.)
    from tests.servers import ServiceUnavailable, throwaway_redis

    try:
        with throwaway_redis() as server:
            client = MultiplexedRedis(server.url, timeout_s=1.0)
            try:
                script = client.register_script(BUSY)
                padding = "x" * 3000  # five commands per read: several batches
                started = time.monotonic()
                results = await asyncio.gather(
                    *(script(keys=[f"k{i}"], args=[10_000, padding]) for i in range(200))
                )
                elapsed = time.monotonic() - started
            finally:
                await client.aclose()
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway Redis: {exc.reason}")
    assert results == [1] * 200
    assert elapsed > 1.0  # the queue really outlasted the bound
