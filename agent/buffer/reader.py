"""Reading the buffer: stored chunks oldest first in bounded slices, and what the buffer holds.

Every read of the `chunks` table outside the writer is here, so the running agent (`Outbox.stats`),
the offline `status` and the uplink count and decode rows the same way:

- a row's size for the cap is `length(body)` (the stored, compressed bytes) + `ROW_OVERHEAD`;
- a row's body is decoded by `agent.buffer.codec.unpack` (raw JSON from older agents, else zstd),
  so `Chunk.body` is always the JSON the uplink sends and `Chunk.stored` what the file holds.

Readers use their own connection (WAL: they never block the writer, and see only committed rows).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.buffer.codec import unpack, unpack_head
from agent.buffer.schema import ROW_OVERHEAD
from agent.core.envelope import id_time


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """What the writer needs to delete a sent chunk and settle the accounts: no body."""

    seq: int
    n: int
    stream: str
    prio: int
    stored: int


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

    @property
    def key(self) -> ChunkKey:
        """This chunk without its body (what `Outbox.acked` queues for the writer)."""
        return ChunkKey(self.seq, self.n, self.stream, self.prio, self.stored)


@dataclass(frozen=True, slots=True)
class Totals:
    """What the buffer holds: events, bytes as the cap counts them (all rows, low-priority rows)."""

    events: int
    bytes: int
    low_bytes: int


def read_chunks(
    conn: sqlite3.Connection, after_seq: int, limit: int, max_bytes: int | None = None
) -> list[Chunk]:
    """The next stored chunks after `after_seq`, oldest first: at most `limit` of them, and no more
    than `max_bytes` of (JSON) bodies (always at least one), so a backlog is never read whole into memory."""
    out: list[Chunk] = []
    total = 0
    cursor = conn.execute(
        "SELECT seq, n, stream, prio, body FROM chunks WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
    )
    try:
        for seq, n, stream, prio, stored in cursor:
            body = unpack(stored)
            out.append(Chunk(seq, n, stream, prio, body, len(stored)))
            total += len(body)
            if max_bytes is not None and total >= max_bytes:
                break
    finally:
        cursor.close()
    return out


def totals(conn: sqlite3.Connection) -> Totals:
    """Events and bytes (stored body + `ROW_OVERHEAD` a row) in the buffer, and the bytes of low-priority rows."""
    events, size, low = conn.execute(
        f"SELECT coalesce(sum(n), 0), coalesce(sum(length(body) + {ROW_OVERHEAD}), 0), "
        f"coalesce(sum(CASE WHEN prio = 0 THEN length(body) + {ROW_OVERHEAD} ELSE 0 END), 0) FROM chunks"
    ).fetchone()
    return Totals(int(events), int(size), int(low))


def oldest_time(conn: sqlite3.Connection) -> float | None:
    """Commit time of the oldest buffered event (from its id), None when the buffer is empty."""
    row = conn.execute("SELECT body FROM chunks ORDER BY seq LIMIT 1").fetchone()
    if row is None:
        return None
    return id_time(unpack_head(row[0], 64))
