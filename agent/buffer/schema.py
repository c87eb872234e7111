"""The buffer file's schema: numbered migrations, the connection settings, the health check."""

from __future__ import annotations

import sqlite3
from pathlib import Path

# Bytes a row costs beyond its body (rowid, stream, record header, b-tree cell): used by the cap.
ROW_OVERHEAD = 24

MIGRATIONS: list[str] = [
    # 1: the outbox (a chunk row holds consecutive events of one stream), key/value state, dedup keys (POS txn ids, Idempotency-Keys), sent watermarks
    """
    CREATE TABLE chunks (
        seq    INTEGER PRIMARY KEY,  -- seq of the chunk's first event; its events are seq .. seq+n-1
        n      INTEGER NOT NULL,
        stream TEXT    NOT NULL,
        prio   INTEGER NOT NULL,
        body   BLOB    NOT NULL      -- the chunk's envelopes, JSON, joined by commas
    );
    CREATE INDEX chunks_low ON chunks(seq) WHERE prio = 0;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID;
    CREATE TABLE dedup (
        ns      TEXT    NOT NULL,
        key     TEXT    NOT NULL,
        seq     INTEGER NOT NULL,
        created REAL    NOT NULL,
        result  BLOB    NOT NULL,
        PRIMARY KEY (ns, key)
    ) WITHOUT ROWID;
    CREATE TABLE watermarks (ts REAL PRIMARY KEY, low_seq INTEGER NOT NULL);
    """,
    # 2: chunks the broker keeps refusing or that can never fit its packets, set aside (kept, retried
    # later, never in front of the rest); a row leaves with its chunk, however the chunk goes
    """
    CREATE TABLE parked (
        seq    INTEGER PRIMARY KEY,  -- the chunk's seq
        since  REAL    NOT NULL,
        reason TEXT    NOT NULL,
        tries  INTEGER NOT NULL DEFAULT 1
    );
    CREATE TRIGGER parked_forget AFTER DELETE ON chunks BEGIN
        DELETE FROM parked WHERE seq = old.seq;
    END;
    """,
]


class BufferCorrupt(Exception):
    """The buffer file is not a healthy SQLite database."""


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the numbered migrations the file has not seen yet (PRAGMA user_version)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN IMMEDIATE;{script};PRAGMA user_version={number};COMMIT;")


def check_file(path: Path) -> None:
    """Raise BufferCorrupt unless SQLite's quick_check passes on the file."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        result = conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise BufferCorrupt("; ".join(str(r[0]) for r in result[:3]))
    except sqlite3.DatabaseError as exc:
        raise BufferCorrupt(str(exc)) from None
    finally:
        conn.close()
