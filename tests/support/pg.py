"""A throwaway PostgreSQL database per test on the machine's server (127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

HOST = os.environ.get("INGEST_TEST_PGHOST", "127.0.0.1")
PORT = int(os.environ.get("INGEST_TEST_PGPORT", "5432"))
USER = os.environ.get("INGEST_TEST_PGUSER", "postgres")


def dsn(dbname: str = "postgres") -> str:
    return f"host={HOST} port={PORT} user={USER} dbname={dbname}"


@contextmanager
def scratch_database(prefix: str = "ingest_test") -> Iterator[str]:
    """Create `prefix_<random>`, yield its DSN, drop it (with any sessions still on it)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield dsn(name)
    finally:
        with psycopg.connect(dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
