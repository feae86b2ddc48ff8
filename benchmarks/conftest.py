"""Benchmarks share the test fixtures (real PostgreSQL, Redis)."""

from tests.conftest import anyio_backend, postgres_schema, postgres_url, redis_prefix, redis_url

__all__ = ["anyio_backend", "postgres_schema", "postgres_url", "redis_prefix", "redis_url"]
