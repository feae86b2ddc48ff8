"""The server helpers find or start real Redis / PostgreSQL and always clean up after."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from redis.asyncio.cluster import RedisCluster

from tests.servers import (
    ServiceUnavailable,
    find_free_port,
    postgres_url_for_tests,
    redis_cluster,
    redis_url_for_tests,
    throwaway_postgres,
    throwaway_redis,
)


def test_find_free_port_can_be_bound() -> None:
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_url_answers_ping(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()


def test_redis_prefix_is_unique_and_usable(redis_url: str, redis_prefix: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set(f"{redis_prefix}k", "v")
        assert client.get(f"{redis_prefix}k") == b"v"


def test_explicit_redis_url_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://redis.invalid:1/3")
    with redis_url_for_tests() as url:
        assert url == "redis://redis.invalid:1/3"


def test_no_redis_anywhere_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to start
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    with (
        pytest.raises(ServiceUnavailable, match="redis-server is not on PATH") as info,
        redis_url_for_tests(local_url=dead),
    ):
        pass
    assert "REDIS_URL is not set" in info.value.reason


@pytest.mark.slow
def test_redis_falls_back_to_a_throwaway_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    with redis_url_for_tests(local_url=dead) as url:
        assert url != dead
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(url) as client:
        client.ping()


@pytest.mark.slow
def test_throwaway_redis_is_cleaned_up_when_the_body_fails() -> None:
    seen: list[tuple[int | None, Path]] = []

    def fail_inside() -> None:
        with throwaway_redis() as server:
            seen.append((server.pid, server.workdir))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    [(pid, workdir)] = seen
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


@pytest.mark.slow
def test_throwaway_redis_on_a_taken_port_fails_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(ServiceUnavailable, match=f"port {port} did not start"),
            throwaway_redis(port=port),
        ):
            pass


def test_explicit_postgres_url_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTWARE_TEST_POSTGRES_URL", "postgresql://x@pg.invalid/db")
    with postgres_url_for_tests() as url:
        assert url == "postgresql://x@pg.invalid/db"


@pytest.mark.slow
def test_throwaway_redis_stops_and_restarts_on_the_same_port() -> None:
    with throwaway_redis() as server:
        port = server.port
        with redis.Redis.from_url(server.url, socket_timeout=1) as client:
            assert client.ping()
            server.stop()
            assert not server.running
            with pytest.raises(redis.ConnectionError):
                client.ping()
            server.start()
            assert server.port == port
            assert client.ping()  # the same client reconnects: recovery needs no new URL
    assert not server.running


@pytest.mark.slow
def test_paused_redis_times_out_instead_of_refusing() -> None:
    with (
        throwaway_redis() as server,
        redis.Redis.from_url(server.url, socket_timeout=0.2) as client,
    ):
        assert client.ping()
        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        assert client.ping()


@pytest.fixture
def cluster_urls() -> Iterator[list[str]]:
    # Started outside the event loop; the context manager's cleanup runs even if the test fails.
    try:
        with redis_cluster(masters=3) as urls:
            yield urls
    except ServiceUnavailable as exc:
        pytest.skip(f"Redis Cluster unavailable: {exc.reason}")


@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_cluster_serves_keys_in_every_slot_range(cluster_urls: list[str]) -> None:
    assert len(cluster_urls) == 3
    client = RedisCluster.from_url(cluster_urls[0])
    try:
        info = await client.cluster_info()
        assert info["cluster_state"] == "ok"
        # One key per master: slots are split evenly in three ranges.
        keys: dict[int, str] = {}
        i = 0
        while len(keys) < 3:
            key = f"key{i}"
            keys.setdefault(client.keyslot(key) * 3 // 16384, key)
            i += 1
        for key in keys.values():
            await client.set(key, key)
        for key in keys.values():
            assert await client.get(key) == key.encode()
        owners = {client.get_node_from_key(key).port for key in keys.values()}
        assert len(owners) == 3
    finally:
        await client.aclose()


def test_postgres_url_answers_select_1(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_postgres_schema_exists_for_this_test(postgres_url: str, postgres_schema: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(sql.Identifier(postgres_schema)))
        row = conn.execute(
            "select count(*) from information_schema.tables where table_schema = %s",
            (postgres_schema,),
        ).fetchone()
        assert row == (1,)


@pytest.mark.slow
def test_throwaway_postgres_answers_and_survives_a_restart() -> None:
    try:
        with throwaway_postgres() as server:
            with psycopg.connect(server.url, autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
                conn.execute("create table kept (x int)")
            server.stop()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(server.url, connect_timeout=2).close()
            server.start()
            with psycopg.connect(server.url) as conn:
                assert conn.execute("select count(*) from kept").fetchone() == (0,)
            root = server.root
    except ServiceUnavailable as exc:
        pytest.skip(f"cannot run a throwaway PostgreSQL here: {exc.reason}")
    assert not server.running
    assert not root.exists()
