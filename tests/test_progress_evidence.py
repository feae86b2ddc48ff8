"""A redis-py client's outage evidence is every reply it reads, not only its finished calls;
a silence past the bound ends the call however it treats a cancellation.

One call can be several round trips (a new connection's handshake, a script reloaded after
NOSCRIPT, a cluster redirect); when each is answered within the bound, Redis is answering,
however long the call as a whole takes (on a CPU-starved host a burst that grows the pool
made the cluster burst proof declare an outage this way).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from redis.exceptions import ResponseError

from tenantware.backends.errors import StoreUnavailable
from tenantware.backends.progress import ProgressWatch, watch_of
from tenantware.backends.redis_support import connect_redis, register_script

pytestmark = pytest.mark.anyio

#: Every reply the proxy holds back: well inside the bound, while a call of four round trips
#: or more (HELLO; EVALSHA answered NOSCRIPT; SCRIPT LOAD; EVALSHA) takes longer than it.
HOLD_S = 0.3
BOUND_S = 0.8


class HeldReplies:
    """A loopback proxy to Redis that passes each reply on ``hold_s`` after it came."""

    def __init__(self) -> None:
        self.hold_s = 0.0
        self.url = ""


@contextlib.asynccontextmanager
async def held_replies(redis_url: str) -> AsyncIterator[HeldReplies]:
    target = urlsplit(redis_url)
    proxy = HeldReplies()
    handlers: set[asyncio.Task[None]] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool) -> None:
        try:
            while data := await source.read(65536):
                if held:
                    await asyncio.sleep(proxy.hold_s)
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy.url = urlunsplit(target._replace(netloc=f"127.0.0.1:{port}"))
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()
        if handlers:  # each ends once the client's side of it is closed
            await asyncio.wait_for(asyncio.gather(*handlers), timeout=10)


async def test_every_reply_a_client_reads_is_evidence(redis_url: str) -> None:
    client = connect_redis(redis_url, timeout_s=BOUND_S)
    progress = watch_of(client)
    try:
        # Neither call runs under the watch: only the connection can have reported them.
        await client.execute_command("PING")
        answered = progress.last_reply
        assert answered > 0
        with pytest.raises(ResponseError):  # a refusal is an answer too
            await client.execute_command("NO-SUCH-COMMAND")
        assert progress.last_reply > answered
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_every_reply_a_cluster_client_reads_is_evidence(cluster_urls: list[str]) -> None:
    client = connect_redis(cluster_urls[0], timeout_s=BOUND_S, cluster=True)
    progress = watch_of(client)
    try:
        await client.execute_command("PING")  # discovers the nodes, then asks one
        answered = progress.last_reply
        assert answered > 0
        # A node learnt from the slot map, not a startup node, reports its replies too.
        key = f"twprogress:{uuid.uuid4().hex}"
        await client.execute_command("SET", key, "1", "PX", 10_000)
        assert progress.last_reply > answered
    finally:
        await client.aclose()


async def test_a_call_of_several_round_trips_each_answered_in_time_is_no_outage(
    redis_url: str,
) -> None:
    async with held_replies(redis_url) as proxy:
        client = connect_redis(proxy.url, timeout_s=BOUND_S)
        progress = watch_of(client)
        try:
            await progress.run(client.execute_command("PING"))  # answered: the bound applies
            await client.connection_pool.disconnect()  # the next call opens a connection
            proxy.hold_s = HOLD_S
            # A script Redis has never seen: NOSCRIPT, then SCRIPT LOAD, then EVALSHA again.
            script = register_script(client, f"return '{uuid.uuid4().hex}'")
            started = asyncio.get_running_loop().time()
            assert await script(keys=[], args=[])
            waited = asyncio.get_running_loop().time() - started
            assert progress.stalls == 0
            # Not a timing check: four held replies or more make the call outlast the bound
            # (the case this test is about), which this confirms.
            assert waited > BOUND_S
        finally:
            await client.aclose()


async def test_a_silence_ends_a_call_that_lost_one_cancellation() -> None:
    # Python 3.11's ``asyncio.wait_for`` (redis-py sends every command with it) returns a
    # result that came in the same turn as a cancellation and drops the cancellation; the
    # call then waits for a reply a stopped Redis never sends. The watch still ends it.
    progress = ProgressWatch(0.2)
    progress.answered = True  # past the first call: the bound applies

    async def losing_one_cancellation() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # lost, as ``wait_for`` loses it
            await asyncio.sleep(30)
        await asyncio.sleep(30)  # the reply that never comes

    with anyio.fail_after(10), pytest.raises(StoreUnavailable):
        await progress.run(losing_one_cancellation())
