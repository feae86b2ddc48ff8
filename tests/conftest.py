"""Shared fixtures: real Redis and PostgreSQL, isolated per test by key prefix and schema."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from tests import early_checks
from tests.servers import (
    ServiceUnavailable,
    postgres_url_for_tests,
    redis_cluster,
    redis_url_for_tests,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the tool runs the selected tests check, in the background (``early_checks``)."""
    for item in items:
        for marker in item.iter_markers("early_check"):
            early_checks.start(marker.args[0])


def pytest_sessionfinish() -> None:
    early_checks.stop_all()


@pytest.fixture
def early_check(request: pytest.FixtureRequest) -> early_checks.Finished:
    """The finished run of the tool named by the test's ``early_check`` marker."""
    (marker,) = request.node.iter_markers("early_check")
    try:
        return early_checks.finish(marker.args[0])
    except LookupError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only; the servers under test are asyncio-based."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One Redis for the whole session; skip (with the reason) only if none can be had."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(redis_url_for_tests())
        except ServiceUnavailable as exc:
            pytest.skip(f"Redis unavailable: {exc.reason}")
        yield url


@pytest.fixture
def cluster_urls() -> Iterator[list[str]]:
    """The node URLs of a fresh 3-master Redis Cluster; skip (with the reason) if none starts."""
    try:
        cluster = redis_cluster(3)
        urls = cluster.__enter__()
    except ServiceUnavailable as exc:
        pytest.skip(f"no Redis Cluster: {exc.reason}")
    try:
        yield urls
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards so tests never collide."""
    prefix = f"twtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One PostgreSQL for the whole session; skip (with the reason) only if none can be had."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_url_for_tests())
        except ServiceUnavailable as exc:
            pytest.skip(f"PostgreSQL unavailable: {exc.reason}")
        yield url


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A schema unique to this test, dropped with everything in it afterwards."""
    schema = f"twtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """Every write of the pipelined Redis connections (``backends/multiplex.py``): the
    commands it carried, for tests that count round trips."""
    from tenantware.backends import multiplex

    seen: list[list[bytes]] = []
    flush = multiplex._Connection._flush

    def recorded(self: Any) -> None:
        if self._outgoing and not self.closed and self.transport is not None:
            seen.append(list(self._outgoing))
        flush(self)

    monkeypatch.setattr(multiplex._Connection, "_flush", recorded)
    return seen
