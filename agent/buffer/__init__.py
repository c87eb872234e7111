"""The SQLite buffer: every event is committed here before anything acknowledges it.

Invariants:
- an event is acknowledged (POS ACK, HTTP 200) only after the transaction holding it is fsync'd;
- an event leaves only after the broker's PUBACK for the batch that carried it;
- `seq` grows strictly in commit order and is never reused, across restarts, quarantines and a
  deleted or emptied file (the seq lease beside the file);
- only low-priority streams (traffic, metrics, telemetry) are ever dropped at the disk cap;
- a write that fails is never reported as "full" unless the cap is reached: `BufferFull` (cap),
  `DiskFull` (ENOSPC, SQLITE_FULL), `BufferIOError` (anything else), and the writer lives on.

On disk: `buffer.db` (SQLite, WAL) with `chunks(seq, n, stream, prio, body)`, one row per run of
at most `chunk_events` events of one stream, `body` their JSON envelopes joined by commas and
zstd-compressed (raw JSON rows of older agents read as they are); `buffer.db.seqlease`, the
seq bound no seq has reached yet.

Modules: `schema` (migrations, connection, health check), `writer` (the one writer thread, its
group commits and what a crash does at each step), `reader` (chunks oldest first, the buffer's
totals: every read of the table outside the writer), `codec` (how a body is stored),
`maintenance` and `idempotency` (keys kept beside the events).
"""

from agent.buffer.reader import Chunk, ChunkKey, read_chunks
from agent.buffer.schema import ROW_OVERHEAD, BufferCorrupt
from agent.buffer.writer import Outbox, OutboxStats

__all__ = ["ROW_OVERHEAD", "BufferCorrupt", "Chunk", "ChunkKey", "Outbox", "OutboxStats", "read_chunks"]
