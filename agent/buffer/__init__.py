"""The SQLite buffer: every event is committed here before anything acknowledges it.

Invariants:
- an event is acknowledged (POS ACK, HTTP 200) only after the transaction holding it is fsync'd;
- an event leaves only after the broker's PUBACK for the batch that carried it;
- `seq` grows strictly in commit order and is never reused, across restarts, quarantines and a
  deleted or emptied file (the seq lease beside the file);
- only low-priority streams (traffic, metrics, telemetry) are ever dropped at the disk cap;
- every file under `data_dir` (the WAL by its reserve) stays within `max_bytes`;
- nothing is written to or sent from a file that has not passed `quick_check` since its last
  unclean stop;
- a write that fails is never reported as "full" unless the cap is reached: `BufferFull` (cap),
  `DiskFull` (ENOSPC, SQLITE_FULL), `BufferIOError` (anything else), and the writer lives on.

On disk: `buffer.db` (SQLite, WAL) with `chunks(seq, n, stream, prio, body)`, one row per run of
at most `chunk_events` events of one stream, `body` their JSON envelopes joined by commas and
zstd-compressed (raw JSON rows of older agents read as they are); `buffer.db.seqlease`, the
seq bound no seq has reached yet; `buffer.db.clean`, present only while the agent is stopped
cleanly (it names the file it vouches for).

Modules: `schema` (migrations, connection, health check), `writer` (the one writer thread, its
group commits and what a crash does at each step), `reader` (chunks oldest first, the buffer's
totals: every read of the table outside the writer), `codec` (how a body is stored),
`footprint` (what counts toward `max_bytes` on disk, the WAL's bound, erasure), `parked`
(set-aside chunks), `maintenance` and `idempotency` (keys kept beside the events).
"""

from agent.buffer.reader import Chunk, ChunkKey, read_chunks
from agent.buffer.schema import ROW_OVERHEAD, BufferCorrupt
from agent.buffer.writer import Outbox, OutboxStats

__all__ = ["ROW_OVERHEAD", "BufferCorrupt", "Chunk", "ChunkKey", "Outbox", "OutboxStats", "read_chunks"]
