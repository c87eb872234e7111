"""The buffer's footprint on disk: what counts toward `[buffer] max_bytes`, and how the WAL is bounded.

Decisions (issue 12):

- Every file the agent keeps under `data_dir` counts: `buffer.db` by its pages in use
  (`page_count - freelist_count`: events, dedup and Idempotency-Key rows, indexes, schema), the
  side files (`-shm`, the seq lease, the run lock, the clean-stop marker) by their size, and the
  WAL by a reserve of twice its bound (up to the bound, plus one transaction written past it
  before the check that truncates it). Quarantined `*.corrupt-*` files are not counted: they are
  the operator's to look at, and counting them would stop a store's POS after a corruption.
- The writer admits a commit against a *logical* cap (bodies + `ROW_OVERHEAD` a row, plus an
  estimate for a dedup row) calibrated after every transaction against the pages really used, so
  the cap follows the file and not an estimate of it, and a transaction adds at most its own
  rows before the next calibration.
- Debian's SQLite is built with `SECURE_DELETE`: every delete after a PUBACK rewrote the freed
  pages, and the WAL reached 695 MB for a 5M backlog. The writer runs `secure_delete=FAST`
  (deleted rows are zeroed inside b-tree pages at no extra I/O; freed overflow pages keep their
  bytes until reused) and `journal_size_limit` = the WAL bound. After a transaction the WAL is
  checkpointed with TRUNCATE when it passed its bound (readers kept SQLite from restarting it) or
  when the buffer has drained, so an idle agent leaves no big WAL behind.
- Erasing on request (`erase_subject`, a later issue) must overwrite what it removes: run its
  deletes inside `overwriting_deletes(conn)` and call `truncate_wal(conn)` after its commit.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

# The WAL's bound: 1/64 of the cap, between these (16 MiB: 4,096 frames, one 32 KiB -shm block).
WAL_BOUND_MIN = 64 * 1024
WAL_BOUND_MAX = 16 << 20
# Below this the WAL is left alone when the buffer drains (truncating costs an fsync).
DRAIN_TRUNCATE_MIN = 1 << 20
# How long a truncation waits for readers to leave the WAL, and the pause after one that could not.
TRUNCATE_BUSY_MS = 250
TRUNCATE_RETRY_S = 1.0
# Side files are sized from the file system at most this often (they change rarely).
SIDE_EVERY_S = 1.0
# A dedup row costs its key and result plus this (record header, b-tree cell, the seq and time),
# counted twice: its b-tree fills at random (keys are not in order), so pages are ~half full.
DEDUP_ROW_OVERHEAD = 32
QUARANTINE_MARK = ".corrupt-"


def wal_bound(max_bytes: int) -> int:
    """The WAL size above which the writer truncates it (also its `journal_size_limit`)."""
    return max(WAL_BOUND_MIN, min(WAL_BOUND_MAX, max_bytes // 64))


def dedup_cost(namespace: str, key: str, result: bytes) -> int:
    """What a dedup row is taken to cost against the cap."""
    return 2 * (len(namespace.encode()) + len(key.encode()) + len(result) + DEDUP_ROW_OVERHEAD)


def wal_path(db: Path) -> Path:
    return db.with_name(db.name + "-wal")


def data_dir_bytes(data_dir: Path, *, quarantined: bool = True) -> int:
    """Bytes of every file under `data_dir` (what `du --apparent-size` says), quarantined ones optional."""
    total = 0
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            if not quarantined and QUARANTINE_MARK in name:
                continue
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def truncate_wal(conn: sqlite3.Connection, busy_ms: int = 2000) -> bool:
    """Checkpoint everything into the database file and truncate the WAL to zero bytes.

    Waits at most `busy_ms` for readers to finish (they are short); False if it could not.
    Outside a transaction only.
    """
    (before,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    try:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={before}")
    return busy == 0


@contextlib.contextmanager
def overwriting_deletes(conn: sqlite3.Connection) -> Iterator[None]:
    """Deletes inside this block overwrite what they remove (`secure_delete=ON`), freed pages included.

    For erasing personal data on request: the ordinary deletes after PUBACK run with FAST. After
    the transaction commits, call `truncate_wal(conn)`, so no copy stays in the WAL either (the WAL
    held the pages as they were written; truncating gives its blocks back to the file system).
    """
    conn.execute("PRAGMA secure_delete=ON")
    try:
        yield
    finally:
        conn.execute("PRAGMA secure_delete=FAST")


class Footprint:
    """The writer's view of the disk: the cap for its admission check, and the WAL kept bounded."""

    def __init__(self, db: Path, max_bytes: int) -> None:
        self.db = Path(db)
        self.wal = wal_path(self.db)
        self.data_dir = self.db.parent
        self.max_bytes = max_bytes
        self.wal_bound = wal_bound(max_bytes)
        self.reserve = 2 * self.wal_bound
        self.db_used = 0  # bytes of database pages in use, at the last calibration
        self.side = 0  # bytes of the side files (everything but the db, its WAL and quarantined files)
        self.overhead = 0  # used - logical, at the last calibration
        self.truncations = 0
        self._side_at = -SIDE_EVERY_S
        self._retry_at = 0.0

    def attach(self, conn: sqlite3.Connection) -> None:
        """Set the writer connection's pragmas for a bounded footprint."""
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute(f"PRAGMA journal_size_limit={self.wal_bound}")
        # SQLite's own passive checkpoint no later than the bound (its default is 1,000 pages,
        # 4 MB): the WAL restarts from the top at the next write once no reader needs its frames,
        # so it stays near the bound on its own, and a TRUNCATE is needed only when readers pinned it
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, min(1000, self.wal_bound // page_size))}")

    @property
    def used(self) -> int:
        """Bytes counted toward the cap at the last calibration (the WAL's reserve apart)."""
        return self.db_used + self.side

    @property
    def cap(self) -> int:
        """The cap on the writer's logical bytes that keeps the whole of data_dir within max_bytes."""
        return self.max_bytes - self.reserve - self.overhead

    def calibrate(self, conn: sqlite3.Connection, logical: int) -> None:
        """Measure the pages in use (and, now and then, the side files) against the logical bytes."""
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self.db_used = (pages - free) * page_size
        now = time.monotonic()
        if now - self._side_at >= SIDE_EVERY_S:
            self._side_at = now
            self.side = self._side_files()
        self.overhead = self.used - logical

    def _side_files(self) -> int:
        own = {self.db.name, self.wal.name}
        total = 0
        for root, _dirs, files in os.walk(self.data_dir):
            for name in files:
                if (root == str(self.data_dir) and name in own) or QUARANTINE_MARK in name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def wal_size(self) -> int:
        try:
            return os.stat(self.wal).st_size
        except FileNotFoundError:
            return 0

    def after_commit(self, conn: sqlite3.Connection, logical: int, events: int) -> None:
        """After each transaction: calibrate, and truncate the WAL past its bound or once drained."""
        size = self.wal_size()
        due = size > self.wal_bound or (events == 0 and size >= min(DRAIN_TRUNCATE_MIN, self.wal_bound))
        # past the reserve the cap keeps for it, the WAL is truncated at every group, readers or not:
        # the reserve is a bound, not a hope (the writer then waits up to TRUNCATE_BUSY_MS a group)
        over_reserve = size > 2 * self.wal_bound
        if due and (over_reserve or time.monotonic() >= self._retry_at):
            if truncate_wal(conn, TRUNCATE_BUSY_MS):
                self.truncations += 1
            else:  # a reader holds on to the WAL: the writer does not wait on it group after group
                self._retry_at = time.monotonic() + TRUNCATE_RETRY_S
        self.calibrate(conn, logical)
