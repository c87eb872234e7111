"""Set-aside chunks: what the broker keeps refusing, or what can never fit its packets.

A set-aside chunk stays in `chunks` (never deleted for being refused: it still counts toward the
cap, the depth and the oldest unsent age); a row in `parked` (migration 2) says why and since when.
The uplink skips these chunks when it reads the backlog and retries them later, one at a time,
once the rest has gone. A trigger drops the `parked` row whenever its chunk leaves the buffer
(acknowledged at last, evicted by the cap, erased).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable


def park(conn: sqlite3.Connection, seqs: Iterable[int], reason: str, now: float) -> int:
    """Set these chunks aside (in the writer's transaction: run through `Outbox.call`); a chunk
    already set aside counts one more try. Chunks no longer stored are ignored. Returns rows touched."""
    touched = 0
    for seq in seqs:
        touched += conn.execute(
            "INSERT INTO parked(seq, since, reason) SELECT seq, ?, ? FROM chunks WHERE seq = ? "
            "ON CONFLICT(seq) DO UPDATE SET tries = tries + 1, reason = excluded.reason",
            (now, reason, seq),
        ).rowcount
    return touched


def read_parked(conn: sqlite3.Connection) -> dict[int, int]:
    """The set-aside chunks: seq -> number of events."""
    return dict(conn.execute("SELECT p.seq, c.n FROM parked p JOIN chunks c ON c.seq = p.seq ORDER BY p.seq"))
