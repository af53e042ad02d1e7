"""Fixtures for tests that need a real Redis or PostgreSQL server.

Both servers run on the development machines and on CI (Redis 7 at 127.0.0.1:6379, PostgreSQL 15
at 127.0.0.1:5432 with trust authentication and a ``test`` database). Where one is absent the tests
that need it are skipped with the reason, except under ``CI=true``, where they fail: CI must never
skip them silently. Override the addresses with ``SAMEGUARD_TEST_REDIS_URL`` and
``SAMEGUARD_TEST_POSTGRES_URL``.

Each test gets its own namespace, so tests (and concurrent runs) never collide: a unique Redis key
prefix (its keys are deleted afterwards) and a unique PostgreSQL schema (dropped afterwards).
:func:`concurrent_statuses` is the burst of requests the multi-process tests send.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

REDIS_URL_ENV = "SAMEGUARD_TEST_REDIS_URL"
POSTGRES_URL_ENV = "SAMEGUARD_TEST_POSTGRES_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def under_ci() -> bool:
    """``True`` when ``CI`` is set to ``true`` (or ``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``; under CI fail it instead."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: tests that need this server fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_server(name: str, url: str, default_port: int, env: str) -> None:
    """Skip (fail under CI) unless a TCP connection to ``url``'s host and port opens within a second."""
    parts = urlsplit(url.replace("+psycopg", ""))
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError as exc:
        unavailable(f"{name} is not reachable at {host}:{port} ({exc}); start it or point {env} at one")


def require_module(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        unavailable(f"the {module} package is not installed: pip install 'sameguard[{extra}]'")


@dataclass(frozen=True)
class RedisServer:
    """A reachable Redis: ``url`` and this test's own key ``prefix``."""

    url: str
    prefix: str


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real Redis and a fresh key prefix; every key under the prefix is deleted after the test."""
    url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
    require_module("redis", "redis")
    require_server("Redis", url, 6379, REDIS_URL_ENV)
    import redis

    prefix = f"sgtest:{uuid.uuid4().hex[:12]}:"
    yield RedisServer(url, prefix)
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a real PostgreSQL whose ``search_path`` is a fresh schema (dropped afterwards)."""
    url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    require_module("psycopg", "postgres")
    require_server("PostgreSQL", url, 5432, POSTGRES_URL_ENV)
    from sqlalchemy import create_engine, text

    schema = f"sgtest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - authentication, missing database, ...
        admin.dispose()
        unavailable(f"PostgreSQL at {url} refused to create a schema ({type(exc).__name__}: {exc})")
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


def concurrent_statuses(clients: int, per_client: int, request: Callable[[Any, int, int], int], *,
                        join_timeout: float, **client_options: Any) -> list[int]:
    """Status codes of ``clients`` threads sending ``per_client`` requests each, concurrently.

    Thread ``j`` opens one ``httpx.Client(**client_options)`` and calls ``request(client, j, k)`` for
    ``k`` in ``range(per_client)``; each call returns the status code of the request it sent.
    """
    import httpx

    statuses: list[int] = []
    lock = threading.Lock()

    def send(j: int) -> None:
        with httpx.Client(**client_options) as client:
            for k in range(per_client):
                code = request(client, j, k)
                with lock:
                    statuses.append(code)

    threads = [threading.Thread(target=send, args=(j,)) for j in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout)
    return statuses
