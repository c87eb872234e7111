"""Idempotency-Keys of the local event API, kept in the outbox's `dedup` table (namespace "api").

A key's stored result is the hex SHA-256 of the request body followed by the commit's id stems
as JSON (`[["<stem>", n], ...]`), from which the exact 200 body is made again: a few dozen bytes
a key instead of the whole list of ids. A retry is thus answered from the buffer file (across
restarts too), and a different body under the same key is recognised.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import orjson

from agent.sink import Committed

NAMESPACE = "api"
DIGEST_LEN = 64  # hex SHA-256
# Keys are kept at least 24 h (the contract); pruning takes those older than twice that.
KEEP_S = 2 * 86400


def stored_result(digest: bytes) -> Callable[[Committed], bytes]:
    """The `Dedup.result` function: the body's digest, then the stems of the ids the commit assigned."""

    def result(committed: Committed) -> bytes:
        return digest + orjson.dumps(committed.stems)

    return result


def parse_result(stored: bytes) -> tuple[bytes, Committed]:
    """(body digest, the first commit's stems) from a stored result."""
    stems = tuple((str(stem), int(n)) for stem, n in orjson.loads(stored[DIGEST_LEN:]))
    return stored[:DIGEST_LEN], Committed(stems)


def lookup(conn: sqlite3.Connection, key: str) -> bytes | None:
    """The stored result of `key`, or None if it was never answered with a 200 (or was pruned)."""
    row = conn.execute("SELECT result FROM dedup WHERE ns=? AND key=?", (NAMESPACE, key)).fetchone()
    return None if row is None else bytes(row[0])


def prune_idempotency(conn: sqlite3.Connection, now: float, keep_s: float = KEEP_S) -> int:
    """Delete the API's keys stored more than `keep_s` seconds before `now`; returns how many.

    Meant for the outbox's writer (`outbox.call(lambda c: prune_idempotency(c, time.time()))`),
    which runs it inside its own transaction.
    """
    cursor = conn.execute("DELETE FROM dedup WHERE ns=? AND created < ?", (NAMESPACE, now - keep_s))
    return cursor.rowcount
