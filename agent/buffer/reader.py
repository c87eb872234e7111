"""Reading the buffer: stored chunks, oldest first, in bounded slices."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored row: `n` consecutive events of one stream, from `seq` on."""

    seq: int
    n: int
    stream: str
    prio: int
    body: bytes  # the chunk's envelopes as JSON, joined by commas (as sent)
    stored: int = -1  # bytes the row's body takes in the file (what the cap counts); -1: len(body)

    def __post_init__(self) -> None:
        if self.stored < 0:
            object.__setattr__(self, "stored", len(self.body))


def read_chunks(
    conn: sqlite3.Connection, after_seq: int, limit: int, max_bytes: int | None = None
) -> list[Chunk]:
    """The next stored chunks after `after_seq`, oldest first: at most `limit` of them, and no more
    than `max_bytes` of bodies (always at least one), so a backlog is never read whole into memory."""
    out: list[Chunk] = []
    total = 0
    cursor = conn.execute(
        "SELECT seq, n, stream, prio, body FROM chunks WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
    )
    try:
        for row in cursor:
            out.append(Chunk(*row))
            total += len(row[4])
            if max_bytes is not None and total >= max_bytes:
                break
    finally:
        cursor.close()
    return out
