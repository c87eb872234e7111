"""The SQLite outbox's writer: every event is committed here before anything acknowledges it.

Design
------
One writer thread owns the write connection. Callers queue work (commits, offers, deletions after
PUBACK, calls) and the writer takes everything queued at once into one transaction: group commit,
one fsync for as many requests as arrived while the previous fsync ran.

A commit goes through three steps inside the group's transaction:

1. encode: the events become JSON envelopes, numbered from the next seq, ids from one UUIDv7
   stem per 65,536 events (`agent.core.envelope`); a bad event refuses its whole request;
2. chunk: consecutive envelopes of one stream, at most `chunk_events` of them, become one row
   (a `Chunk`), its body compressed (`agent.buffer.codec`);
3. admit: the cap (`max_bytes`) takes the rows, dropping the oldest low-priority rows
   (prio 0: traffic, metrics, telemetry) to make room, or refuses the request (`BufferFull`);
   the seq lease is extended when the new seqs pass it.

Invariants
----------
- A caller is answered only after COMMIT returned (synchronous=FULL, so fsync'd) or the
  transaction was rolled back; a request is all or nothing.
- Only rows with prio 0 are ever evicted by the cap; `pos`, `scan`, `command`, `pickup` are
  refused instead (the device keeps its copy and resends); `system` rows pass the cap.
- Counters (`count`, `bytes`, `events_in`, `events_dropped`, the pending `system.dropped`
  counts) change only after COMMIT: a rolled-back group leaves them as they were.
- `seq` is never reused. Seqs are leased in blocks of `SEQ_LEASE_BLOCK`, written (fsync'd,
  atomically renamed) to `buffer.db.seqlease` before any seq of the block is committed; the
  lease the file last took is recorded in its `meta` table (`seq_lease`). On open, a file that
  does not know the lease on disk (deleted, emptied, quarantined, an old copy) starts at the
  lease; the file that does continues from its own `last_seq` (no gap at a plain restart).
- No exception ends the writer thread. A group that fails (`sqlite3.Error`, `OSError`, anything)
  is rolled back; every caller in it gets a `BufferUnavailable` saying why (`DiskFull` for
  ENOSPC / SQLITE_FULL, `BufferIOError` for the rest), `failure` holds the reason until a
  later commit succeeds, and deletions of that group are retried with the next one.

On-disk layout (see `schema`): `chunks(seq, n, stream, prio, body)`, `meta` (`last_seq`,
`seq_lease`), `dedup`, `watermarks`; beside the file, `buffer.db.seqlease`.

What a crash does at each step
------------------------------
- before COMMIT: nothing of the group is in the file; no caller was answered; the lease may
  already be extended (seqs skipped, never reused).
- after COMMIT, before the answers: the events are stored; the device or client, unanswered,
  resends; dedup keys (POS txn ids, Idempotency-Keys) turn the resend into a duplicate.
- during deletions after PUBACK: a deletion group is not fsync'd by itself (synchronous=NORMAL);
  a crash may undo it and the chunks are sent again (at least once; ids make it once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.buffer.codec import pack
from agent.buffer.footprint import Footprint, dedup_cost, truncate_wal
from agent.buffer.reader import Chunk, ChunkKey, oldest_time, totals
from agent.buffer.schema import (
    ROW_OVERHEAD,
    BufferCorrupt,
    check_file,
    connect,
    migrate,
    read_clean_totals,
    record_clean_stop,
    record_clean_totals,
    take_clean_stop,
)
from agent.core.envelope import (
    PRIORITY_LOW,
    EnvelopeEncoder,
    EnvelopeError,
    Event,
    UtcFormatter,
    Uuid7,
    priority_of,
)
from agent.sink import BufferFull, BufferIOError, BufferUnavailable, Committed, Dedup, DiskFull

if TYPE_CHECKING:
    from agent.config import AgentConfig

log = logging.getLogger(__name__)

# Seqs are leased in blocks recorded outside the database, so a new or quarantined buffer never reuses one.
SEQ_LEASE_BLOCK = 1_000_000
# How many queued requests one transaction takes at most.
GROUP_MAX_ITEMS = 4096
# How long `close()` waits for the writer to finish what is queued (within systemd's 20 s stop budget).
CLOSE_TIMEOUT_S = 5.0
SQLITE_FULL = 13
# `failure` while the cap refuses commits: nothing failed to be written, the file stays sound
CAP_REACHED = "buffer full: the disk cap is reached"


@dataclass(slots=True)
class _Commit:
    events: Sequence[Event]
    dedup: Dedup | None
    done: Callable[[Committed | BaseException], None] | None
    best_effort: bool = False


@dataclass(slots=True)
class _Ack:
    keys: Sequence[ChunkKey]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    done: Callable[[Any], None]


@dataclass(slots=True)
class CallResult:
    """What an `Outbox.call` function may return to change more than SQL rows, in the same transaction.

    `events` are committed with the call (or, refused by the cap, the call's SQL is undone and the
    caller gets `BufferFull`); `removed_*` are what the call took out of `chunks` (an erasure),
    so the writer's accounts follow. The caller gets `value`.
    """

    value: Any = None
    events: Sequence[Event] = ()
    removed_events: int = 0
    removed_bytes: int = 0  # as the cap counts them (stored body + ROW_OVERHEAD a row)
    removed_low_bytes: int = 0


@dataclass(slots=True)
class _Row:
    """A chunk about to be inserted: the chunk (JSON body, for the accounts) and its stored body."""

    chunk: Chunk
    packed: bytes

    @property
    def size(self) -> int:
        return len(self.packed) + ROW_OVERHEAD


@dataclass(slots=True)
class _Group:
    """One transaction's work and the account changes it makes, applied only after COMMIT."""

    now: float
    count: int
    nbytes: int  # as the cap counts them (stored body + ROW_OVERHEAD a row)
    low_bytes: int
    next_seq: int
    extra: int = 0  # dedup rows staged in this group, as the cap counts them (footprint.dedup_cost)
    rows: list[_Row] = field(default_factory=list)
    dedups: list[tuple[str, str, int, float, bytes]] = field(default_factory=list)
    settled: list[tuple[Callable[[Any], None], Any]] = field(default_factory=list)
    added: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_recorded: bool = False  # the group's system.dropped event took the pending counts
    refused: bool = False  # the cap refused a request in this group

    def dedup_hit(self, dedup: Dedup) -> bytes | None:
        for ns, key, _seq, _created, result in self.dedups:
            if ns == dedup.namespace and key == dedup.key:
                return result
        return None

    def write(self, conn: sqlite3.Connection) -> None:
        """Insert what is staged (before anything reads the tables in this transaction)."""
        if self.dedups:
            conn.executemany(
                "INSERT INTO dedup(ns, key, seq, created, result) VALUES(?,?,?,?,?)", self.dedups
            )
            self.dedups.clear()
        if self.rows:
            conn.executemany(
                "INSERT INTO chunks(seq, n, stream, prio, body) VALUES(?,?,?,?,?)",
                [(r.chunk.seq, r.chunk.n, r.chunk.stream, r.chunk.prio, r.packed) for r in self.rows],
            )
            self.rows.clear()


@dataclass
class OutboxStats:
    """What the outbox holds right now (events not yet acknowledged upstream) and its counters."""

    events: int
    bytes: int
    oldest_unsent_s: float
    next_seq: int
    events_in: dict[str, int] = field(default_factory=dict)
    events_sent: dict[str, int] = field(default_factory=dict)
    events_dropped: dict[str, int] = field(default_factory=dict)


def unavailable(exc: BaseException) -> BufferUnavailable:
    """The `BufferUnavailable` a failed write answers with: a full disk is never "buffer full"."""
    if isinstance(exc, BufferUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        if code is not None and code & 0xFF == SQLITE_FULL:
            return DiskFull(f"disk full: {exc} ({name})")
        return BufferIOError(f"buffer I/O error: {exc} ({name})")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(f"disk full: {exc}")
        return BufferIOError(f"buffer I/O error: {exc}")
    return BufferIOError(f"buffer writer error: {type(exc).__name__}: {exc}")


class Outbox:
    """The durable event buffer: `with Outbox.from_config(cfg) as outbox:` (or `open()`, `start()`, `close()`).

    `chunk_events` bounds how many events one row holds (the uplink's batch size), so a batch
    is sent as stored rows joined, with no per-event work.
    """

    def __init__(
        self,
        path: Path,
        *,
        tenant: str = "tenant",
        store: str = "store",
        agent: str = "agent",
        max_bytes: int = 1 << 30,
        chunk_events: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.chunk_events = max(1, chunk_events)
        self._clock = clock
        self._encoder = EnvelopeEncoder(tenant, store, agent)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._ids = Uuid7()
        self._fmt = UtcFormatter()
        self._read_local = threading.local()
        self.count = 0
        self.bytes = 0
        self.low_bytes = 0
        self.next_seq = 1
        self._lease = 0
        self._lease_recorded = 0  # the lease the file's meta row holds
        self._lease_path = self.path.with_name(self.path.name + ".seqlease")
        self.events_in: Counter[str] = Counter()
        self.events_sent: Counter[str] = Counter()
        self.events_dropped: Counter[str] = Counter()
        self._dropped_pending: Counter[str] = Counter()
        self._last_dropped_event = 0.0
        self._retry_acks: list[_Ack] = []  # deletions of a failed group, retried with the next
        self.quarantined: str | None = None
        self.last_error: str | None = None
        # why commits fail right now (None while they succeed): /healthz, status and /metrics show it
        self.failure: str | None = None
        self._committed_listeners: list[Callable[[], None]] = []
        self._durable = True
        # what counts toward max_bytes on disk, and the WAL's bound (agent/buffer/footprint.py)
        self.footprint = Footprint(self.path, max_bytes)
        # set once the file is known sound (checked, or closed cleanly): nothing is sent before
        self.checked = threading.Event()
        self.checked_fully = False  # whether open() ran the full quick_check (after an unclean stop)

    @property
    def max_bytes(self) -> int:
        """The cap on the whole data_dir, `[buffer] max_bytes`: the footprint's, its one copy."""
        return self.footprint.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        # the admission check reads `footprint.cap`: a copy kept here would be set and never read
        self.footprint.max_bytes = value

    @classmethod
    def from_config(cls, cfg: AgentConfig, **overrides: Any) -> Outbox:
        """The agent's outbox as its config describes it (path, identity, cap, chunk size)."""
        kwargs: dict[str, Any] = {
            "tenant": cfg.agent.tenant,
            "store": cfg.agent.store,
            "agent": cfg.agent.id,
            "max_bytes": cfg.buffer.max_bytes,
            "chunk_events": cfg.mqtt.batch_size,
        }
        kwargs.update(overrides)
        return cls(cfg.buffer_path, **kwargs)

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> Outbox:
        """Open (creating or migrating) the file; a corrupt one is moved aside, never deleted."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = self.path.exists() and take_clean_stop(self.path)
        if self.path.exists() and not clean:
            self.checked_fully = True
            try:
                check_file(self.path)
            except BufferCorrupt as exc:
                self._quarantine(str(exc))
        elif self.path.exists():
            log.info("buffer %s was closed cleanly: full check skipped", self.path.name)
        self._conn = connect(self.path)
        self.footprint.attach(self._conn)
        migrate(self._conn)
        self.next_seq, self._lease, self._lease_recorded = self._seq_start(self._conn)
        held = read_clean_totals(self._conn) if clean else None
        if held is None:  # after an unclean stop: counted again (0.7 s for 5M events out of cache)
            counted = totals(self._conn)
            held = (counted.events, counted.bytes, counted.low_bytes)
        self.count, self.bytes, self.low_bytes = held
        self.footprint.calibrate(self._conn, self.bytes)
        self.checked.set()
        if self.quarantined is not None:
            event = Event(
                "system.buffer_quarantined", {"moved_to": self.quarantined, "error": self.last_error}, "agent"
            )
            self._queue.put(_Commit((event,), None, None))
        return self

    def _seq_start(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """(next seq, lease on disk, lease the file recorded): where seq goes on from.

        The file that recorded the lease on disk is the one seqs were last committed to: it goes
        on from its own `last_seq`. Any other file (new, emptied, quarantined, an old copy put
        back) starts at the lease, above every seq ever handed out. A file from before the lease
        was recorded (`last_seq` but no `seq_lease`) is trusted once, to add no gap on upgrade.
        """
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('last_seq', 'seq_lease')"))
        last_seq = int(meta.get("last_seq", 0))
        recorded = int(meta["seq_lease"]) if "seq_lease" in meta else None
        lease = self._read_lease()
        knows_lease = recorded == lease or (recorded is None and "last_seq" in meta)
        if lease and not knows_lease:
            log.warning(
                "buffer %s does not know the seq lease %d (new, emptied or replaced): seq goes on from it",
                self.path,
                lease,
            )
            last_seq = max(last_seq, lease - 1)
        return last_seq + 1, lease, recorded or 0

    def start(self) -> Outbox:
        """Start the writer thread (opening the file first if needed)."""
        if self._conn is None:
            self.open()
        self._thread = threading.Thread(target=self._writer, name="outbox-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish what is queued, then stop the writer and close the file; waits at most `timeout` s.

        A writer still busy after that (a disk that hangs) is left behind, logged: it closes the
        file itself if it ever returns. The agent must stop within its SIGTERM budget regardless.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("buffer writer did not finish within %.0f s: leaving it behind", timeout)
                self.failure = self.failure or "buffer writer is stuck"
                self._thread = None
                self._conn = None
                return
            self._thread = None
            self._conn = None  # the writer closed it
        if self._conn is not None:  # opened, never started
            self._close_file(self._conn, clean=True)
            self._conn = None

    def _close_file(self, conn: sqlite3.Connection, clean: bool) -> None:
        """Close the write connection; after a clean stop, leave the marker that lets the next
        start skip the full check (everything in the file, the WAL emptied, the totals recorded)."""
        clean = (
            clean
            and not conn.in_transaction
            and record_clean_totals(conn, (self.count, self.bytes, self.low_bytes))
            and truncate_wal(conn)
        )
        conn.close()
        if clean and self.path.exists():
            try:
                record_clean_stop(self.path)
            except OSError as exc:  # no marker: the next start checks the file fully
                log.warning("could not record a clean stop of %s: %s", self.path, exc)

    def __enter__(self) -> Outbox:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def queued(self) -> int:
        """How many requests wait for the writer (commits, offers, deletions, calls)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """True while the writer thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def on_committed(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from the writer thread) after each transaction that added events."""
        self._committed_listeners.append(listener)

    def _quarantine(self, error: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        self.quarantined = target.name
        self.last_error = error
        log.error("buffer %s is corrupt (%s): moved to %s, starting a new one", self.path, error, target)

    def _read_lease(self) -> int:
        try:
            return int(self._lease_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_lease(self, value: int) -> None:
        tmp = self._lease_path.with_name(self._lease_path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(f"{value}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._lease_path)
        dir_fd = os.open(self._lease_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._lease = value

    # ---- what drivers, the local API and the uplink call -----------------------------------------

    async def commit(self, events: Sequence[Event], dedup: Dedup | None = None) -> Committed:
        """Commit durably (fsync'd) before returning; all or nothing. Raises BufferUnavailable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Committed] = loop.create_future()

        def done(result: Committed | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, result)

        self._queue.put(_Commit(events, dedup, done))
        return await fut

    def commit_sync(self, events: Sequence[Event], dedup: Dedup | None = None) -> Committed:
        """`commit` for callers outside the event loop (threads, tests, benchmarks)."""
        fut: concurrent.futures.Future[Committed] = concurrent.futures.Future()
        self._queue.put(_Commit(events, dedup, _settle_cf(fut)))
        return fut.result()

    def offer(self, event: Event) -> None:
        """Best effort, no waiting: committed with the next group, or counted as dropped."""
        self._queue.put(_Commit((event,), None, None, best_effort=True))

    def acked(self, chunks: Sequence[Chunk]) -> None:
        """The broker acknowledged these chunks: delete them (in the writer's next group).

        Only their keys wait for the writer, never their bodies: memory stays flat however long
        the writer is behind during a drain.
        """
        keys = [chunk.key for chunk in chunks]
        for key in keys:
            self.events_sent[key.stream] += key.n
        self._queue.put(_Ack(keys))

    def call(self, fn: Callable[[sqlite3.Connection], Any], timeout: float | None = None) -> Any:
        """Run `fn(conn)` in the writer thread, inside its transaction, and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Call(fn, _settle_cf(fut)))
        return fut.result(timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued before this call is written."""
        self.call(lambda conn: None, timeout=timeout)

    def read_conn(self) -> sqlite3.Connection:
        """This thread's own read connection (WAL readers never block the writer)."""
        conn = getattr(self._read_local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._read_local.conn = conn
        return conn

    def stats(self) -> OutboxStats:
        """Depth, bytes and age of the oldest unsent event; counters per stream."""
        oldest = 0.0
        if self.count:
            try:
                first = oldest_time(self.read_conn())
            except (sqlite3.Error, ValueError) as exc:  # status must answer even so; the uplink reports it
                log.warning("cannot read the oldest buffered event: %s", exc)
                first = None
            if first is not None:
                oldest = max(0.0, self._clock() - first)
        return OutboxStats(
            events=self.count,
            bytes=self.bytes,
            oldest_unsent_s=oldest,
            next_seq=self.next_seq,
            events_in=dict(self.events_in),
            events_sent=dict(self.events_sent),
            events_dropped=dict(self.events_dropped),
        )

    # ---- the writer --------------------------------------------------------------------------

    def _writer(self) -> None:
        conn = self._conn
        assert conn is not None
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        stopping = False
        try:
            while not stopping:
                items = [get()]
                while len(items) < GROUP_MAX_ITEMS:
                    try:
                        items.append(get_nowait())
                    except queue.Empty:
                        break
                if None in items:
                    stopping = True
                    items = [i for i in items if i is not None]
                try:
                    self._run_group(conn, items, final=stopping)
                except Exception as exc:  # a bug, not the disk: answered, logged, and the writer goes on
                    log.exception("buffer writer: group failed unexpectedly")
                    self._fail(items, unavailable(exc))
        finally:
            # a refusal at the cap wrote nothing: only a failed write keeps the next start's full check
            self._close_file(conn, clean=stopping and self.failure in (None, CAP_REACHED))

    def _run_group(self, conn: sqlite3.Connection, items: list[Any], final: bool = False) -> None:
        if self._retry_acks:
            items = [*self._retry_acks, *items]
            self._retry_acks = []
        group = _Group(self._clock(), self.count, self.bytes, self.low_bytes, self.next_seq)
        try:
            self._set_durable(conn, any(isinstance(item, _Commit) for item in items) or final)
            if conn.in_transaction:  # a ROLLBACK that failed last time
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for item in items:
                if isinstance(item, _Commit):
                    outcome = self._stage(conn, item, group)
                    if item.done is not None:
                        group.settled.append((item.done, outcome))
                elif isinstance(item, _Ack):
                    self._delete(conn, item.keys, group)
                else:  # _Call: runs after what was staged before it, so it sees it
                    group.write(conn)
                    conn.execute("SAVEPOINT call")
                    try:
                        value = self._run_call(conn, item, group)
                        conn.execute("RELEASE call")
                        group.settled.append((item.done, value))
                    except Exception as exc:
                        if not conn.in_transaction:  # SQLite rolled the transaction back: the group fails
                            raise
                        conn.execute("ROLLBACK TO call")  # this call's SQL only; the group goes on
                        conn.execute("RELEASE call")
                        group.settled.append((item.done, exc))  # handed back to the caller
            pending = self._dropped_pending + group.dropped
            if pending and (final or group.now - self._last_dropped_event >= 10):
                self._stage_dropped_event(conn, group, pending)
            group.write(conn)
            meta = [("last_seq", group.next_seq - 1)]
            if self._lease != self._lease_recorded:
                meta.append(("seq_lease", self._lease))
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                meta,
            )
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            self._retry_acks = [item for item in items if isinstance(item, _Ack)]
            self._fail([item for item in items if not isinstance(item, _Ack)], unavailable(exc))
            return
        self._apply(conn, group)

    def _run_call(self, conn: sqlite3.Connection, item: _Call, group: _Group) -> Any:
        """Run a call's function; a `CallResult`'s events are staged and its removals accounted."""
        value = item.fn(conn)
        if not isinstance(value, CallResult):
            return value
        if value.events:
            outcome = self._stage(conn, _Commit(value.events, None, None), group)
            if isinstance(outcome, BaseException):
                raise outcome
            group.write(conn)  # inside the savepoint: undone with the call if anything fails later
        group.count -= value.removed_events
        group.nbytes -= value.removed_bytes
        group.low_bytes -= value.removed_low_bytes
        return value.value

    def _set_durable(self, conn: sqlite3.Connection, durable: bool) -> None:
        # Only commits need fsync: a deletion after PUBACK that a crash undoes means one resend
        # (at least once), so a group of deletions alone is not synced (WAL + synchronous=NORMAL);
        # the next durable commit's fsync covers it anyway.
        if durable != self._durable:
            conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self._durable = durable

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # tried again before the next group begins
            log.error("buffer rollback failed: %s", exc)

    def _fail(self, items: list[Any], error: BufferUnavailable) -> None:
        """Answer every caller of a rolled-back group with `error`; remember why commits fail."""
        reason = str(error)
        if self.failure != reason:
            log.error("buffer write failed, nothing of the group was stored: %s", reason)
        self.failure = self.last_error = reason
        lost: Counter[str] = Counter()
        for item in items:
            if isinstance(item, _Commit) and item.best_effort:
                for event in item.events:
                    lost[event.stream] += 1
            done = getattr(item, "done", None)
            if done is not None:
                _answer(done, error)
        if lost:  # offers have no caller to retry them: they are gone, and counted
            self.events_dropped.update(lost)

    def _apply(self, conn: sqlite3.Connection, group: _Group) -> None:
        """After COMMIT: the accounts, the answers, the listeners."""
        self.count, self.bytes, self.low_bytes, self.next_seq = (
            group.count,
            group.nbytes,
            group.low_bytes,
            group.next_seq,
        )
        self._lease_recorded = self._lease
        self.events_in.update(group.added)
        try:
            self.footprint.after_commit(conn, self.bytes, self.count)
        except (sqlite3.Error, OSError) as exc:  # measuring failed: the last calibration stands
            log.warning("buffer footprint not measured: %s", exc)
        self.events_dropped.update(group.dropped)
        if group.dropped_recorded:
            self._dropped_pending.clear()
            self._last_dropped_event = group.now
        else:
            self._dropped_pending.update(group.dropped)
        if group.refused:
            self.failure = CAP_REACHED
        elif group.added:
            self.failure = None
        for done, outcome in group.settled:
            _answer(done, outcome)
        if group.added:
            for listener in self._committed_listeners:
                try:
                    listener()
                except Exception:
                    log.exception("buffer: a committed-listener failed")

    def _delete(self, conn: sqlite3.Connection, keys: Sequence[ChunkKey], group: _Group) -> None:
        for key in keys:
            # the cap may have dropped a low-priority chunk while it was in flight, or an erasure
            # rewritten it: the accounts take what the row holds now, not what was sent
            row = conn.execute(
                "DELETE FROM chunks WHERE seq=? RETURNING n, length(body), prio", (key.seq,)
            ).fetchone()
            if row is None:
                continue
            n, stored, prio = row
            size = stored + ROW_OVERHEAD
            group.count -= n
            group.nbytes -= size
            if prio == PRIORITY_LOW:
                group.low_bytes -= size

    # ---- a commit: encode, chunk, admit ----------------------------------------------------------

    def _stage(self, conn: sqlite3.Connection, item: _Commit, group: _Group) -> Committed | BaseException:
        dedup = item.dedup
        if dedup is not None:
            hit = group.dedup_hit(dedup)
            if hit is None:
                row = conn.execute(
                    "SELECT result FROM dedup WHERE ns=? AND key=?", (dedup.namespace, dedup.key)
                ).fetchone()
                hit = None if row is None else row[0]
            if hit is not None:
                return Committed(duplicate=True, result=hit)
        first = group.next_seq
        try:
            stems, envelopes = self._encode(item.events, first, group.now)
        except EnvelopeError as exc:
            return exc
        result = b""
        if dedup is not None:
            if callable(dedup.result):
                try:
                    result = dedup.result(Committed(tuple(stems), first))
                except Exception as exc:  # handed back to the caller; the writer goes on
                    return exc
            else:
                result = dedup.result
        rows = self._chunk(item.events, envelopes, first)
        cost = 0 if dedup is None else dedup_cost(dedup.namespace, dedup.key, result)
        refused = self._admit(conn, rows, group, cost)
        if refused is not None:
            if item.best_effort:
                for row in rows:
                    group.dropped[row.chunk.stream] += row.chunk.n
            return refused
        if dedup is not None:
            group.dedups.append((dedup.namespace, dedup.key, first, group.now, result))
        return Committed(tuple(stems), first, result=result)

    def _encode(
        self, events: Sequence[Event], first: int, now: float
    ) -> tuple[list[tuple[str, int]], list[bytes]]:
        """Step 1: the events' envelopes, numbered from `first`, and the (id stem, count) pairs."""
        now_ms = int(now * 1000)
        stems: list[tuple[str, int]] = []
        envelopes: list[bytes] = []
        for offset in range(0, len(events), Uuid7.PER_STEM):
            part = events[offset : offset + Uuid7.PER_STEM]
            stem = self._ids.stem(now_ms)
            envelopes += self._encoder.encode_many(part, first + offset, stem, self._fmt.format(now_ms))
            stems.append((stem, len(part)))
        return stems, envelopes

    def _chunk(self, events: Sequence[Event], envelopes: list[bytes], first: int) -> list[_Row]:
        """Step 2: runs of one stream, at most `chunk_events` long, each one row with its body compressed."""
        rows: list[_Row] = []
        start = 0
        for i in range(1, len(events) + 1):
            if i == len(events) or events[i].stream != events[start].stream or i - start >= self.chunk_events:
                stream = events[start].stream
                body = b",".join(envelopes[start:i])
                packed = pack(body)
                rows.append(
                    _Row(
                        Chunk(first + start, i - start, stream, priority_of(stream), body, len(packed)),
                        packed,
                    )
                )
                start = i
        return rows

    def _admit(
        self, conn: sqlite3.Connection, rows: list[_Row], group: _Group, cost: int = 0
    ) -> BufferFull | None:
        """Step 3: the cap takes the rows (evicting low-priority ones) or refuses them; the lease covers them.

        `cost` is what the commit's dedup key adds on disk. The cap is `footprint.cap`: `max_bytes`
        less what the other files under data_dir take (the WAL by its reserve).
        """
        need = sum(r.size for r in rows)
        over = group.nbytes + group.extra + need + cost - self.footprint.cap
        # system events pass the cap; a request that stores only its Idempotency-Key does not
        if over > 0 and not (rows and all(r.chunk.stream == "system" for r in rows)):
            if not self._make_room(conn, group, over):
                group.refused = True
                return BufferFull(CAP_REACHED)
        seq = group.next_seq + sum(r.chunk.n for r in rows)
        if seq > self._lease:
            self._write_lease(seq + SEQ_LEASE_BLOCK)  # an OSError fails the whole group
        group.next_seq = seq
        group.count += sum(r.chunk.n for r in rows)
        group.nbytes += need
        group.extra += cost
        group.low_bytes += sum(r.size for r in rows if r.chunk.prio == PRIORITY_LOW)
        group.rows.extend(rows)
        for r in rows:
            group.added[r.chunk.stream] += r.chunk.n
        return None

    def _make_room(self, conn: sqlite3.Connection, group: _Group, needed: int) -> bool:
        """Drop the oldest low-priority chunks until `needed` bytes are free; False if they can't be.

        Only low-priority streams (traffic, telemetry) are ever dropped; `pos`, `scan`, `command`
        and `pickup` are refused instead, so the device keeps its copy and resends.
        """
        if group.low_bytes < needed:
            return False
        group.write(conn)
        freed = 0
        victims: list[tuple[int]] = []
        cursor = conn.execute("SELECT seq, n, stream, length(body) FROM chunks WHERE prio = 0 ORDER BY seq")
        for seq, n, stream, length in cursor:
            victims.append((seq,))
            freed += length + ROW_OVERHEAD
            group.count -= n
            group.dropped[stream] += n
            if freed >= needed:
                break
        cursor.close()
        conn.executemany("DELETE FROM chunks WHERE seq=?", victims)
        group.nbytes -= freed
        group.low_bytes -= freed
        return freed >= needed

    def _stage_dropped_event(self, conn: sqlite3.Connection, group: _Group, counts: Counter[str]) -> None:
        event = Event(
            "system.dropped",
            {"reason": "buffer_cap", "streams": dict(counts), "count": sum(counts.values())},
            "agent",
        )
        # system events pass the cap, so this cannot be refused: no drop goes unrecorded
        self._stage(conn, _Commit((event,), None, None), group)
        group.dropped_recorded = True


def _answer(done: Callable[[Any], None], outcome: Any) -> None:
    try:
        done(outcome)
    except Exception:  # e.g. the caller's event loop is closed: nothing to tell, nothing to stop for
        log.debug("buffer: a caller could not be answered", exc_info=True)


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _settle_cf(fut: concurrent.futures.Future[Any]) -> Callable[[Any], None]:
    def done(result: Any) -> None:
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    return done
