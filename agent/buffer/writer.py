"""The SQLite outbox: every event is committed here before anything acknowledges it.

One writer thread owns the write connection. Callers queue work (commits, offers, deletions after
PUBACK) and the writer takes everything queued at once into one transaction: group commit, one
fsync for as many requests as arrived while the previous fsync ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from typing import Any

from agent.buffer.footprint import Footprint, dedup_cost, truncate_wal
from agent.buffer.reader import Chunk
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
    id_time,
    priority_of,
)
from agent.sink import BufferFull, Committed, Dedup

log = logging.getLogger(__name__)

# Seqs are leased in blocks recorded outside the database, so a quarantined buffer never reuses one.
SEQ_LEASE_BLOCK = 1_000_000
# How many queued requests one transaction takes at most.
GROUP_MAX_ITEMS = 4096

@dataclass(slots=True)
class _Commit:
    events: Sequence[Event]
    dedup: Dedup | None
    done: Callable[[Committed | BaseException], None] | None
    best_effort: bool = False


@dataclass(slots=True)
class _Ack:
    chunks: Sequence[Chunk]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    done: Callable[[Any], None]


@dataclass(slots=True)
class _GroupState:
    count: int
    bytes: int
    low_bytes: int
    next_seq: int
    extra: int = 0  # dedup rows staged in this group, as the cap counts them (footprint.dedup_cost)


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


class Outbox:
    """The durable event buffer: `open()`, `start()` its writer, `close()`.

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
        self.max_bytes = max_bytes
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
        self._lease_path = self.path.with_name(self.path.name + ".seqlease")
        self.events_in: Counter[str] = Counter()
        self.events_sent: Counter[str] = Counter()
        self.events_dropped: Counter[str] = Counter()
        self._dropped_pending: Counter[str] = Counter()
        self._last_dropped_event = 0.0
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
        row = self._conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        last_seq = int(row[0]) if row else 0
        lease = self._read_lease()
        if self.quarantined is not None:
            last_seq = max(last_seq, lease - 1)
        self.next_seq = last_seq + 1
        self._lease = lease if lease > self.next_seq else 0
        totals = read_clean_totals(self._conn) if clean else None
        if totals is None:  # after an unclean stop: counted again (0.7 s for 5M events out of cache)
            size = f"coalesce(sum(length(body)), 0) + count(*) * {ROW_OVERHEAD}"
            count, total = self._conn.execute(f"SELECT coalesce(sum(n), 0), {size} FROM chunks").fetchone()
            totals = (count, total, self._conn.execute(f"SELECT {size} FROM chunks WHERE prio = 0").fetchone()[0])
        self.count, self.bytes, self.low_bytes = totals
        self.footprint.calibrate(self._conn, self.bytes)
        self.checked.set()
        if self.quarantined is not None:
            event = Event(
                "system.buffer_quarantined", {"moved_to": self.quarantined, "error": self.last_error}, "agent"
            )
            self._queue.put(_Commit((event,), None, None))
        return self

    def start(self) -> Outbox:
        """Start the writer thread (opening the file first if needed)."""
        if self._conn is None:
            self.open()
        self._thread = threading.Thread(target=self._writer, name="outbox-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Finish what is queued, then stop the writer and close the file."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            # everything into the file and the WAL emptied, so the marker can vouch for the file
            clean = (not self._conn.in_transaction
                     and record_clean_totals(self._conn, (self.count, self.bytes, self.low_bytes))
                     and truncate_wal(self._conn))
            self._conn.close()
            self._conn = None
            if clean and self.path.exists():
                try:
                    record_clean_stop(self.path)
                except OSError as exc:  # no marker: the next start checks the file fully
                    log.warning("could not record a clean stop of %s: %s", self.path, exc)

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
        """The broker acknowledged these chunks: delete them (in the writer's next group)."""
        for chunk in chunks:
            self.events_sent[chunk.stream] += chunk.n
        self._queue.put(_Ack(chunks))

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
            row = self.read_conn().execute("SELECT body FROM chunks ORDER BY seq LIMIT 1").fetchone()
            if row:
                oldest = max(0.0, self._clock() - id_time(row[0]))
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
        assert self._conn is not None
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        stopping = False
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
            self._run_group(self._conn, items, final=stopping)

    def _run_group(self, conn: sqlite3.Connection, items: list[Any], final: bool = False) -> None:
        now = self._clock()
        settled: list[tuple[Callable[[Any], None], Any]] = []
        staged = _Staged()
        state = _GroupState(self.count, self.bytes, self.low_bytes, self.next_seq)
        added: Counter[str] = Counter()
        # Only commits need fsync: a deletion after PUBACK that a crash undoes means one resend
        # (at least once), so a group of deletions alone is not synced (WAL + synchronous=NORMAL);
        # the next durable commit's fsync covers it anyway.
        durable = any(isinstance(item, _Commit) for item in items) or final
        if durable != self._durable:
            conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self._durable = durable
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in items:
                if isinstance(item, _Commit):
                    outcome = self._stage(conn, item, now, state, staged, added)
                    if item.done is not None:
                        settled.append((item.done, outcome))
                elif isinstance(item, _Ack):
                    for chunk in item.chunks:
                        # the cap may have dropped a low-priority chunk while it was in flight:
                        # only rows really deleted here leave the accounts
                        if not conn.execute("DELETE FROM chunks WHERE seq=?", (chunk.seq,)).rowcount:
                            continue
                        size = chunk.stored + ROW_OVERHEAD
                        state.count -= chunk.n
                        state.bytes -= size
                        if chunk.prio == PRIORITY_LOW:
                            state.low_bytes -= size
                else:  # _Call: runs after what was staged before it, so it sees it
                    staged.write(conn)
                    try:
                        settled.append((item.done, item.fn(conn)))
                    except Exception as exc:  # handed back to the caller
                        settled.append((item.done, exc))
            if self._dropped_pending and (final or now - self._last_dropped_event >= 10):
                self._stage_dropped_event(conn, now, state, staged, added)
            staged.write(conn)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES('last_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (state.next_seq - 1,),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("buffer write failed: %s", exc)
            self.last_error = f"buffer write failed: {exc}"
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for item in items:
                done = getattr(item, "done", None)
                if done is not None:
                    done(BufferFull(f"buffer write failed: {exc}"))
            return
        self.count, self.bytes, self.low_bytes, self.next_seq = (
            state.count, state.bytes, state.low_bytes, state.next_seq
        )
        self.events_in.update(added)
        try:
            self.footprint.after_commit(conn, self.bytes, self.count)
        except (sqlite3.Error, OSError) as exc:  # measuring failed: the last calibration stands
            log.warning("buffer footprint not measured: %s", exc)
        for done, outcome in settled:
            done(outcome)
        if added:
            for listener in self._committed_listeners:
                listener()

    def _stage(
        self,
        conn: sqlite3.Connection,
        item: _Commit,
        now: float,
        state: _GroupState,
        staged: _Staged,
        added: Counter[str],
    ) -> Committed | BaseException:
        dedup = item.dedup
        if dedup is not None:
            hit = staged.dedup_hit(dedup) or conn.execute(
                "SELECT result FROM dedup WHERE ns=? AND key=?", (dedup.namespace, dedup.key)
            ).fetchone()
            if hit is not None:
                return Committed(duplicate=True, result=hit[0])
        events = item.events
        first = state.next_seq
        stems: list[tuple[str, int]] = []
        bodies: list[bytes] = []
        try:
            for offset in range(0, len(events), Uuid7.PER_STEM):
                part = events[offset : offset + Uuid7.PER_STEM]
                stem = self._ids.stem(int(now * 1000))
                bodies += self._encoder.encode_many(part, first + offset, stem, self._fmt.format(int(now * 1000)))
                stems.append((stem, len(part)))
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
        seq = first + len(bodies)
        chunks: list[tuple[int, int, str, int, bytes]] = []
        run: list[bytes] = []
        run_stream = ""
        for i, event in enumerate(events):
            if event.stream != run_stream or len(run) >= self.chunk_events:
                if run:
                    chunks.append(_chunk_row(first + i - len(run), run, run_stream))
                run = []
                run_stream = event.stream
            run.append(bodies[i])
        if run:
            chunks.append(_chunk_row(seq - len(run), run, run_stream))
        need = sum(len(c[4]) + ROW_OVERHEAD for c in chunks)
        need_low = sum(len(c[4]) + ROW_OVERHEAD for c in chunks if c[3] == PRIORITY_LOW)
        cost = 0 if dedup is None else dedup_cost(dedup.namespace, dedup.key, result)
        over = state.bytes + state.extra + need + cost - self.footprint.cap
        # system events pass the cap; a request that stores only its Idempotency-Key does not
        if over > 0 and not (chunks and all(c[2] == "system" for c in chunks)):
            if not self._make_room(conn, state, over, staged):
                if item.best_effort:
                    for c in chunks:
                        self.events_dropped[c[2]] += c[1]
                        self._dropped_pending[c[2]] += c[1]
                return BufferFull("buffer full: the disk cap is reached")
        if seq > self._lease:
            self._write_lease(seq + SEQ_LEASE_BLOCK)
        state.next_seq = seq
        state.count += seq - first
        state.bytes += need
        state.low_bytes += need_low
        state.extra += cost
        staged.rows.extend(chunks)
        for c in chunks:
            added[c[2]] += c[1]
        if dedup is not None:
            staged.dedups.append((dedup.namespace, dedup.key, first, now, result))
        return Committed(tuple(stems), first, result=result)

    def _make_room(self, conn: sqlite3.Connection, state: _GroupState, needed: int, staged: _Staged) -> bool:
        """Drop the oldest low-priority chunks until `needed` bytes are free; False if they can't be.

        Only low-priority streams (traffic, telemetry) are ever dropped; `pos`, `scan`, `command`
        and `pickup` are refused instead, so the device keeps its copy and resends.
        """
        if state.low_bytes < needed:
            return False
        staged.write(conn)
        freed = 0
        victims: list[tuple[int]] = []
        cursor = conn.execute("SELECT seq, n, stream, length(body) FROM chunks WHERE prio = 0 ORDER BY seq")
        for seq, n, stream, length in cursor:
            victims.append((seq,))
            freed += length + ROW_OVERHEAD
            state.count -= n
            self.events_dropped[stream] += n
            self._dropped_pending[stream] += n
            if freed >= needed:
                break
        cursor.close()
        conn.executemany("DELETE FROM chunks WHERE seq=?", victims)
        state.bytes -= freed
        state.low_bytes -= freed
        return freed >= needed

    def _stage_dropped_event(
        self, conn: sqlite3.Connection, now: float, state: _GroupState, staged: _Staged, added: Counter[str]
    ) -> None:
        counts = dict(self._dropped_pending)
        self._dropped_pending.clear()
        self._last_dropped_event = now
        event = Event(
            "system.dropped",
            {"reason": "buffer_cap", "streams": counts, "count": sum(counts.values())},
            "agent",
        )
        # system events pass the cap, so this cannot be refused: no drop goes unrecorded
        self._stage(conn, _Commit((event,), None, None), now, state, staged, added)


class _Staged:
    """Writes gathered during one group, flushed with executemany."""

    __slots__ = ("rows", "dedups")

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, int, bytes]] = []
        self.dedups: list[tuple[str, str, int, float, bytes]] = []

    def dedup_hit(self, dedup: Dedup) -> tuple[bytes] | None:
        for ns, key, _seq, _created, result in self.dedups:
            if ns == dedup.namespace and key == dedup.key:
                return (result,)
        return None

    def write(self, conn: sqlite3.Connection) -> None:
        if self.dedups:
            conn.executemany("INSERT INTO dedup(ns, key, seq, created, result) VALUES(?,?,?,?,?)", self.dedups)
            self.dedups.clear()
        if self.rows:
            conn.executemany("INSERT INTO chunks(seq, n, stream, prio, body) VALUES(?,?,?,?,?)", self.rows)
            self.rows.clear()


def _chunk_row(first_seq: int, envelopes: list[bytes], stream: str) -> tuple[int, int, str, int, bytes]:
    return (first_seq, len(envelopes), stream, priority_of(stream), b",".join(envelopes))


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
