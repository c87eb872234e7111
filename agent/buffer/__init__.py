"""The SQLite buffer: every event is committed here before anything acknowledges it.

Invariants:
- an event is acknowledged (POS ACK, HTTP 200) only after the transaction holding it is fsync'd;
- an event leaves only after the broker's PUBACK for the batch that carried it;
- `seq` grows strictly in commit order and is never reused, across restarts and quarantines;
- only low-priority streams (traffic, metrics, telemetry) are ever dropped at the disk cap;
- every file under `data_dir` (the WAL by its reserve) stays within `max_bytes`;
- nothing is written to or sent from a file that has not passed `quick_check` since its last
  unclean stop.

Modules: `schema` (migrations, connection, health check), `writer` (the one writer thread and
its group commits), `reader` (chunks, oldest first), `maintenance` and `idempotency` (keys kept
beside the events), `footprint` (what counts toward `max_bytes` on disk, the WAL's bound, erasure).
"""

from agent.buffer.reader import Chunk, read_chunks
from agent.buffer.schema import ROW_OVERHEAD, BufferCorrupt
from agent.buffer.writer import Outbox, OutboxStats

__all__ = ["ROW_OVERHEAD", "BufferCorrupt", "Chunk", "Outbox", "OutboxStats", "read_chunks"]
