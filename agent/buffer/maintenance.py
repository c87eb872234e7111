"""Housekeeping the daemon runs every hour in the buffer's writer: forgetting old dedup keys.

POS `(register, txn_id)` keys (and the payload hashes of `pos.invalid` frames) must be remembered at least 7 days after their event was *sent*
(contract 4.1). Sending deletes the event, so each hour a watermark records "everything up to seq
S had left the buffer at time T"; a POS key may go once a watermark at least 7 days old covers
its seq. Idempotency-Keys of the local API go 48 h after they were stored. Command ids (the
`commands` table: a repeated id gets its stored reply) go 7 days after they were received.
"""

from __future__ import annotations

import sqlite3

from agent.buffer.idempotency import KEEP_S, prune_idempotency

POS_KEEP_S = 7 * 86400
COMMAND_KEEP_S = 7 * 86400


def record_watermark(conn: sqlite3.Connection, now: float) -> int:
    """Record the highest seq below which nothing is buffered any more; returns it."""
    low = conn.execute("SELECT min(seq) FROM chunks").fetchone()[0]
    if low is None:
        row = conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        covered = int(row[0]) if row else 0
    else:
        covered = int(low) - 1
    conn.execute("INSERT OR REPLACE INTO watermarks(ts, low_seq) VALUES(?, ?)", (now, covered))
    return covered


def prune_pos_keys(conn: sqlite3.Connection, now: float, keep_s: float = POS_KEEP_S) -> int:
    """Forget POS keys whose events left the buffer more than `keep_s` ago; returns how many."""
    row = conn.execute(
        "SELECT low_seq FROM watermarks WHERE ts <= ? ORDER BY ts DESC LIMIT 1", (now - keep_s,)
    ).fetchone()
    if row is None:
        return 0
    deleted = conn.execute(
        "DELETE FROM dedup WHERE (ns LIKE 'pos:%' OR ns LIKE 'pos-invalid:%') AND seq <= ?", (row[0],)
    ).rowcount
    # the watermark just used is kept: it is the one later prunes start from
    conn.execute(
        "DELETE FROM watermarks WHERE ts < (SELECT max(ts) FROM watermarks WHERE ts <= ?)", (now - keep_s,)
    )
    return deleted


def prune_commands(conn: sqlite3.Connection, now: float, keep_s: float = COMMAND_KEEP_S) -> int:
    """Forget command ids received more than `keep_s` ago; returns how many."""
    return int(conn.execute("DELETE FROM commands WHERE created < ?", (now - keep_s,)).rowcount)


def hourly(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    """Everything the daemon does each hour, in one transaction of the writer."""
    watermark = record_watermark(conn, now)
    return {
        "watermark": watermark,
        "pos_keys_pruned": prune_pos_keys(conn, now),
        "api_keys_pruned": prune_idempotency(conn, now, KEEP_S),
        "command_ids_pruned": prune_commands(conn, now),
    }
