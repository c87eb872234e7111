"""The agent's buffer as tests see it: open one, fill one before the agent starts, read what it holds.

Tests read stored events through these functions only, so that a change in how chunks are stored
(their encoding, their table) is followed here once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from agent.buffer import Chunk, Outbox, read_chunks
from agent.core.envelope import Event


@contextlib.contextmanager
def open_outbox(path: Path, **kw: Any) -> Iterator[Outbox]:
    """A started Outbox on `path` (a real SQLite file), closed afterwards."""
    with Outbox(path, **kw) as outbox:
        yield outbox


def chunk_events(chunk: Chunk) -> list[dict[str, Any]]:
    """The envelopes one stored chunk holds, in order."""
    return orjson.loads(b"[" + chunk.body + b"]")


def stored_events(buffer: Outbox | Path, limit: int = 1_000_000) -> list[dict[str, Any]]:
    """Every envelope in the buffer file, in seq order, read through a connection of its own
    (what any other process would see: only what is committed)."""
    conn = sqlite3.connect(buffer.path if isinstance(buffer, Outbox) else buffer)
    try:
        return [e for c in read_chunks(conn, 0, limit) for e in chunk_events(c)]
    finally:
        conn.close()


def stored_count(path: Path) -> int:
    """How many events the buffer file holds (not yet acknowledged upstream), read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])
    finally:
        conn.close()


def prefill(
    data_dir: Path,
    events: Sequence[Event],
    *,
    batch: int = 500,
    tenant: str = "acme",
    store: str = "s1",
    agent: str = "a1",
    **outbox_kw: Any,
) -> list[str]:
    """Commit `events` into the agent's own buffer file (`data_dir/buffer.db`) before it starts,
    `batch` events per commit; returns their ids. The identity must be the config's."""
    ids: list[str] = []
    with open_outbox(data_dir / "buffer.db", tenant=tenant, store=store, agent=agent, **outbox_kw) as outbox:
        for start in range(0, len(events), batch):
            ids += outbox.commit_sync(events[start : start + batch]).ids
    return ids
