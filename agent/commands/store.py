"""The `commands` table (schema migration 3): each command id once, with its outcome and reply bytes.

A row is written in the buffer's writer transaction that also commits the command's
`command.executed` / `command.refused` event (and, for `erase_subject`, the erasure itself), before
the reply is published; a repeat of the id is answered from the row and runs nothing. `acked` is
set once the broker acknowledged the reply (PUBACK); rows without it are published again after a
reconnect. Rows are kept 7 days and pruned by the hourly maintenance
(`agent.buffer.maintenance.prune_commands`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    name: str
    ok: bool
    code: str | None
    reply: bytes
    resp_topic: str | None
    corr: bytes | None


_COLS = "id, name, ok, code, reply, resp_topic, corr"


def _row(row: tuple) -> Stored:  # type: ignore[type-arg]
    cid, name, ok, code, reply, resp_topic, corr = row
    return Stored(cid, name, bool(ok), code, bytes(reply), resp_topic, None if corr is None else bytes(corr))


def lookup(conn: sqlite3.Connection, cid: str) -> Stored | None:
    row = conn.execute(f"SELECT {_COLS} FROM commands WHERE id=?", (cid,)).fetchone()
    return None if row is None else _row(row)


def insert(conn: sqlite3.Connection, rec: Stored, now: float) -> Stored | None:
    """Record a command; returns the row already stored under its id instead, if there is one."""
    old = lookup(conn, rec.id)
    if old is not None:
        return old
    conn.execute(
        f"INSERT INTO commands({_COLS}, created) VALUES(?,?,?,?,?,?,?,?)",
        (rec.id, rec.name, int(rec.ok), rec.code, rec.reply, rec.resp_topic, rec.corr, now),
    )
    return None


def mark_acked(conn: sqlite3.Connection, ids: list[str]) -> None:
    conn.executemany("UPDATE commands SET acked=1 WHERE id=? AND acked=0", [(i,) for i in ids])


def unacked(conn: sqlite3.Connection, limit: int = 1000) -> list[Stored]:
    """Replies stored but not acknowledged by the broker, oldest first."""
    rows = conn.execute(f"SELECT {_COLS} FROM commands WHERE acked=0 ORDER BY created LIMIT ?", (limit,))
    return [_row(r) for r in rows]
