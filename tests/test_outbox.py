"""The buffer's promises, through its public API, on real SQLite files (and a real tmpfs for a full disk)."""

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.buffer import ROW_OVERHEAD, Outbox, read_chunks
from agent.buffer.reader import oldest_time, totals
from agent.buffer.writer import SEQ_LEASE_BLOCK, unavailable
from agent.cli.status import offline_status
from agent.config import AgentConfig
from agent.core.envelope import EnvelopeError, Event
from agent.sink import BufferFull, BufferIOError, Committed, Dedup, DiskFull
from tests.support.agentproc import wait_until

# The whole data_dir counts toward the cap (footprint.py): about 190 KiB of it is the WAL's
# reserve, the -shm file and the empty schema, so this leaves events about 64 KiB.
SMALL_CAP = 256 * 1024


def envelopes(outbox: Outbox) -> list[dict]:
    chunks = read_chunks(outbox.read_conn(), 0, 1_000_000)
    return [e for c in chunks for e in orjson.loads(b"[" + c.body + b"]")]


def pad(n: int = 600) -> str:
    """Text that does not compress (the cap counts stored, compressed bytes)."""
    return os.urandom(n // 2).hex()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "buffer.db", tenant="acme", store="s1", agent="a1", chunk_events=3) as ob:
        yield ob


@contextlib.contextmanager
def wedged(outbox: Outbox) -> Iterator[None]:
    """Hold the writer inside a call until the block ends, so what is queued meanwhile forms one group."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(30)

    holder = threading.Thread(target=outbox.call, args=(hold,))
    holder.start()
    assert entered.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def test_commit_is_durable_and_ordered(outbox, tmp_path):
    first = outbox.commit_sync([Event("app.a", {"i": i}, "x") for i in range(7)])
    second = outbox.commit_sync([Event("pos.sale", {"t": 1}, "pos:1")])
    assert list(first.seqs) == list(range(1, 8)) and list(second.seqs) == [8]
    # read with a separate connection: what was acknowledged is in the file
    conn = sqlite3.connect(tmp_path / "buffer.db")
    assert conn.execute("SELECT sum(n) FROM chunks").fetchone()[0] == 8
    assert [c[0] for c in conn.execute("SELECT n FROM chunks ORDER BY seq")] == [3, 3, 1, 1]  # chunk_events=3
    conn.close()
    got = envelopes(outbox)
    assert [e["seq"] for e in got] == list(range(1, 9))
    assert [e["id"] for e in got] == first.ids + second.ids
    assert got[0]["data"] == {"i": 0} and got[0]["tenant"] == "acme" and got[0]["agent"] == "a1"
    assert outbox.count == 8
    assert outbox.events_in == {"app": 7, "pos": 1}


def test_bodies_are_stored_compressed_and_read_as_json(outbox, tmp_path):
    outbox.commit_sync([Event("app.a", {"member": "m1", "lane": i % 4}, "x") for i in range(3)])
    conn = sqlite3.connect(tmp_path / "buffer.db")
    (stored,) = conn.execute("SELECT body FROM chunks").fetchone()
    conn.close()
    assert stored[:4] == b"\x28\xb5\x2f\xfd", "a zstd frame"
    (chunk,) = read_chunks(outbox.read_conn(), 0, 10)
    assert chunk.body[:7] == b'{"id":"' and chunk.stored == len(stored) < len(chunk.body)
    assert outbox.bytes == chunk.stored + ROW_OVERHEAD


def test_rows_of_an_older_agent_uncompressed_still_read_and_send(tmp_path):
    path = tmp_path / "buffer.db"
    with Outbox(path) as ob:  # creates the schema
        pass
    old = b'{"id":"0193a5f0-7c1e-7d2a-9b1f-3c2e8a1d4f55","seq":1,"type":"pos.sale","data":{}}'
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO chunks(seq, n, stream, prio, body) VALUES(1, 1, 'pos', 2, ?)", (old,))
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('last_seq', 1)")
    conn.close()
    with Outbox(path) as ob:
        assert (ob.count, ob.bytes) == (1, len(old) + ROW_OVERHEAD)
        ob.commit_sync([Event("pos.sale", {"i": 2}, "pos:1")])
        chunks = read_chunks(ob.read_conn(), 0, 10)
        assert [c.body[:1] for c in chunks] == [b"{", b"{"] and chunks[0].body == old
        assert chunks[0].stored == len(old)
        assert oldest_time(ob.read_conn()) == 0x0193A5F07C1E / 1000
        ob.acked(chunks)
        ob.flush()
        assert (ob.count, ob.bytes) == (0, 0)


def test_seq_survives_restart(tmp_path):
    with Outbox(tmp_path / "b.db") as ob:
        ob.commit_sync([Event("app.a", {}, "x")] * 5)
        ob.acked(read_chunks(ob.read_conn(), 0, 100))  # everything sent and deleted
    with Outbox(tmp_path / "b.db") as ob:
        assert ob.count == 0
        assert list(ob.commit_sync([Event("app.a", {}, "x")]).seqs) == [6], "a plain restart adds no gap"


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_seq_is_never_reused_when_the_buffer_file_is_lost(tmp_path, how):
    path = tmp_path / "buffer.db"
    with Outbox(path) as ob:
        seqs = list(ob.commit_sync([Event("app.a", {"i": i}, "x") for i in range(5)]).seqs)
    assert seqs == [1, 2, 3, 4, 5]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "emptied":
        path.write_bytes(b"")
    with Outbox(path) as ob:
        again = list(ob.commit_sync([Event("app.a", {}, "x")]).seqs)
    assert again == [6 + SEQ_LEASE_BLOCK], "seq goes on from the lease, above every seq handed out"
    with Outbox(path) as ob:  # and the new file, which knows the lease, adds no gap at its restart
        assert list(ob.commit_sync([Event("app.a", {}, "x")]).seqs) == [7 + SEQ_LEASE_BLOCK]


def test_a_bad_event_commits_nothing_of_its_request(outbox):
    with pytest.raises(EnvelopeError):
        outbox.commit_sync([Event("app.a", {"ok": 1}, "x"), Event("app.b", {"bad": {1, 2}}, "x")])
    assert outbox.count == 0 and envelopes(outbox) == []
    assert list(outbox.commit_sync([Event("app.a", {}, "x")]).seqs) == [1]


def test_dedup_key_commits_once_and_returns_the_first_result(outbox):
    key = Dedup("pos:R1", "R1-000123", b"first")
    a = outbox.commit_sync([Event("pos.sale", {"txn_id": "R1-000123"}, "pos:1")], key)
    b = outbox.commit_sync(
        [Event("pos.sale", {"txn_id": "R1-000123"}, "pos:1")], Dedup("pos:R1", "R1-000123", b"2")
    )
    assert (a.duplicate, a.count, list(a.seqs)) == (False, 1, [1])
    assert b == Committed(duplicate=True, result=b"first") and b.count == 0
    assert outbox.count == 1
    # another register's same txn_id is another transaction
    c = outbox.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R2", "R1-000123"))
    assert (c.duplicate, list(c.seqs)) == (False, [2]) and outbox.count == 2


def test_dedup_within_one_group(outbox):
    """Two commits with the same key in the same transaction: the second sees the first."""
    key = Dedup("api", "k1", b"r")

    async def both() -> list[Committed]:
        with wedged(outbox):  # both commits are queued before the writer takes its next group
            first = asyncio.ensure_future(outbox.commit([Event("app.a", {}, "x")], key))
            second = asyncio.ensure_future(outbox.commit([Event("app.a", {}, "x")], key))
            await asyncio.sleep(0)
        return list(await asyncio.gather(first, second))

    a, b = asyncio.run(both())
    assert (a.duplicate, list(a.seqs)) == (False, [1])
    assert b == Committed(duplicate=True, result=b"r")
    assert outbox.count == 1


def test_cap_drops_oldest_low_priority_first_and_records_it(tmp_path):
    ob = Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP).start()
    for i in range(150):
        ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad()}, "ble")])
    kept = [e["data"]["i"] for e in envelopes(ob) if e["type"] == "traffic.summary"]
    assert kept == list(range(150 - len(kept), 150)), "the oldest go first, the newest stay"
    assert ob.events_dropped == {"traffic": 150 - len(kept)} and len(kept) < 150
    assert ob.bytes == totals(ob.read_conn()).bytes <= ob.max_bytes
    # POS transactions take the place of traffic, never the other way round
    for i in range(40):
        ob.commit_sync([Event("pos.sale", {"i": i, "pad": pad()}, "pos:1")])
    refused_at = None
    for i in range(1000):
        try:
            ob.commit_sync([Event("pos.sale", {"n": i, "pad": pad()}, "pos:1")])
        except BufferFull as exc:
            refused_at = i
            assert exc.code == "buffer_full"
            break
    assert refused_at is not None
    assert ob.failure == "buffer full: the disk cap is reached"
    # what traffic is left could not make room for one more sale: the cap counts the file's pages
    # (footprint.py), so the slack of half-empty pages is room that evicting rows does not give back
    sale_row = (
        max(c.stored for c in read_chunks(ob.read_conn(), 0, 10_000) if c.stream == "pos") + ROW_OVERHEAD
    )
    assert ob.low_bytes < ob.bytes + sale_row - ob.footprint.cap
    assert ob.low_bytes < ob.bytes // 5, "most of the traffic made room for the sales"
    pos_kept = [e for e in envelopes(ob) if e["type"] == "pos.sale"]
    assert len(pos_kept) == 40 + refused_at, "no POS transaction was ever dropped"
    # some traffic may be left (above): every event dropped is counted, and only traffic was
    left = sum(e["type"] == "traffic.summary" for e in envelopes(ob))
    assert ob.events_dropped == {"traffic": 150 - left}
    ob.close()  # the final group records the drops
    with Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP) as ob:
        dropped = [e for e in envelopes(ob) if e["type"] == "system.dropped"]
        assert sum(d["data"]["streams"]["traffic"] for d in dropped) == 150 - left
        assert {k for d in dropped for k in d["data"]["streams"]} == {"traffic"}


def test_cap_never_evicts_a_pos_transaction_even_the_oldest_row(tmp_path):
    """Issue 17: the oldest row is a POS sale; the cap must evict the newer traffic, never the sale."""
    with Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP) as ob:
        sale = ob.commit_sync([Event("pos.sale", {"txn_id": "R1-1", "pad": pad()}, "pos:1")])
        for i in range(200):
            ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad()}, "ble")])
        got = envelopes(ob)
        assert got[0]["id"] == sale.ids[0] and got[0]["data"]["txn_id"] == "R1-1"
        traffic = [e["data"]["i"] for e in got if e["type"] == "traffic.summary"]
        assert ob.events_dropped == {"traffic": 200 - len(traffic)} and len(traffic) < 200
        assert traffic == list(range(200 - len(traffic), 200))


def test_best_effort_offer_is_counted_when_refused(tmp_path):
    with Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP) as ob:
        with pytest.raises(BufferFull):
            for _ in range(1000):
                ob.commit_sync([Event("pos.sale", {"pad": pad(500)}, "pos:1")])
        ob.offer(Event("presence.arrive", {"pad": pad(500)}, "ble"))
        ob.flush()
        assert ob.events_dropped == {"presence": 1}


def test_acked_chunks_are_deleted_and_accounted(outbox):
    outbox.commit_sync([Event("app.a", {"i": i}, "x") for i in range(10)])
    chunks = read_chunks(outbox.read_conn(), 0, 2)
    outbox.acked(chunks)
    outbox.flush()
    assert outbox.count == 4
    assert outbox.events_sent == {"app": 6}
    rest = read_chunks(outbox.read_conn(), 0, 100)
    assert [c.seq for c in rest] == [7, 10], "after flush() a reader sees none of the acknowledged chunks"
    assert outbox.bytes == sum(c.stored + ROW_OVERHEAD for c in rest)


def test_acknowledged_chunks_wait_for_the_writer_without_their_bodies(outbox):
    """Issue 12: memory stays flat in a drain however far the writer is behind: acks queue keys only."""
    outbox.commit_sync([Event("app.a", {"i": i}, "x") for i in range(9)])
    chunks = read_chunks(outbox.read_conn(), 0, 100)
    bodies = [c.body for c in chunks]
    with wedged(outbox):
        held = [sys.getrefcount(b) for b in bodies]  # `bodies`, the chunks, and the counting itself
        outbox.acked(chunks)
        del chunks
        assert outbox.queued == 1
        # the chunks were the only other holders: the queued deletion holds no body
        assert [sys.getrefcount(b) for b in bodies] == [n - 1 for n in held]
    outbox.flush()
    assert (outbox.count, outbox.bytes) == (0, 0)


def test_a_chunk_dropped_by_the_cap_while_in_flight_is_not_counted_twice(tmp_path):
    with Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP) as ob:
        ob.commit_sync([Event("traffic.summary", {"i": -1, "pad": pad()}, "ble")])
        in_flight = read_chunks(ob.read_conn(), 0, 1)  # the uplink has read (and published) it
        for i in range(300):  # the cap drops the oldest traffic, the chunk in flight among them
            ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad()}, "ble")])
        assert in_flight[0].seq not in [c.seq for c in read_chunks(ob.read_conn(), 0, 10_000)]
        ob.acked(in_flight)  # its PUBACK arrives after the cap dropped it
        ob.flush()
        rows = read_chunks(ob.read_conn(), 0, 10_000)
        assert ob.count == sum(c.n for c in rows)
        assert ob.bytes == sum(c.stored + ROW_OVERHEAD for c in rows)


def test_running_and_offline_status_count_the_buffer_alike(tmp_path):
    cfg = AgentConfig.model_validate(
        {
            "agent": {"tenant": "acme", "store": "s1", "id": "a1", "data_dir": str(tmp_path)},
            "mqtt": {"host": None},
            "buffer": {"max_bytes": SMALL_CAP},
        }
    )
    with Outbox.from_config(cfg) as ob:
        assert (ob.path, ob.max_bytes, ob.chunk_events) == (cfg.buffer_path, SMALL_CAP, cfg.mqtt.batch_size)
        ob.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(3)])
        for i in range(100):
            ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad()}, "ble")])
        ob.acked(read_chunks(ob.read_conn(), 0, 1))
        ob.flush()
        live = ob.stats()
        offline = offline_status(cfg)["buffer"]
        assert (offline["events"], offline["bytes"]) == (live.events, live.bytes)
        # what came in, less what was sent and dropped (a drop commits a system.dropped event too)
        assert live.events == sum(live.events_in.values()) - sum(live.events_sent.values()) - sum(
            live.events_dropped.values()
        )
        held = totals(ob.read_conn())
        assert (held.events, held.bytes, held.low_bytes) == (ob.count, ob.bytes, ob.low_bytes)
        assert envelopes(ob)[0]["type"] == "traffic.summary"


def test_writer_pragmas_as_sqlite_reports_them(outbox):
    """Issue 17: commits run with synchronous=FULL (2) in WAL mode; deletions alone with NORMAL (1)."""

    def probe(conn: sqlite3.Connection) -> tuple[int, str]:
        return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute(
            "PRAGMA journal_mode"
        ).fetchone()[0]

    results: list[tuple[int, str]] = []
    with wedged(outbox):  # the commit and the probe land in one group
        committing = threading.Thread(target=outbox.commit_sync, args=([Event("app.a", {}, "x")],))
        committing.start()
        assert wait_until(lambda: outbox.queued == 1, 10)
        prober = threading.Thread(target=lambda: results.append(outbox.call(probe)))
        prober.start()
        assert wait_until(lambda: outbox.queued == 2, 10)
    committing.join(10)
    prober.join(10)
    assert results == [(2, "wal")] and outbox.count == 1
    with wedged(outbox):  # deletions alone: not fsync'd (a crash means one resend)
        outbox.acked(read_chunks(outbox.read_conn(), 0, 10))
        prober = threading.Thread(target=lambda: results.append(outbox.call(probe)))
        prober.start()
        assert wait_until(lambda: outbox.queued == 2, 10)
    prober.join(10)
    assert results[1] == (1, "wal") and outbox.count == 0


def test_a_failing_listener_does_not_stop_the_writer(outbox):
    calls = []
    outbox.on_committed(lambda: 1 / 0)
    outbox.on_committed(lambda: calls.append(1))
    outbox.commit_sync([Event("app.a", {}, "x")])
    assert wait_until(lambda: calls == [1], 10)
    assert list(outbox.commit_sync([Event("app.a", {}, "x")]).seqs) == [2] and outbox.alive


def test_close_returns_even_when_the_writer_is_stuck(tmp_path):
    ob = Outbox(tmp_path / "b.db").start()
    with wedged(ob):
        closer = threading.Thread(target=ob.close, kwargs={"timeout": 0.2})
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() came back while the writer was still busy"
        assert ob.failure == "buffer writer is stuck" and not ob.alive


def test_sqlite_errors_are_told_apart():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t(x)")
    ro = sqlite3.connect("file::memory:?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as readonly:
        ro.execute("CREATE TABLE t(x)")
    assert isinstance(unavailable(readonly.value), BufferIOError)
    assert isinstance(unavailable(OSError(28, "No space left on device")), DiskFull)
    assert isinstance(unavailable(OSError(30, "Read-only file system")), BufferIOError)
    assert isinstance(unavailable(RuntimeError("bug")), BufferIOError)


# ---- a real full disk and a directory nothing can be written to ---------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root can mount one; so can CI, which runs as root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the file system holding `directory`; delete the file to give them back."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    fh.write(os.urandom(size))
            except OSError:
                pass
    return filler


def test_full_disk_at_the_seq_lease_answers_disk_full_and_recovers(small_fs):
    """The seq lease write fails with ENOSPC: callers get DiskFull, the writer lives, and recovers."""
    ob = Outbox(small_fs / "buffer.db").start()  # no commit yet: the first one writes the lease
    filler = fill(small_fs)
    try:
        with pytest.raises(DiskFull) as exc:
            ob.commit_sync([Event("pos.sale", {"i": 1}, "pos:1")])
        assert exc.value.code == "disk_full"
        assert ob.alive and ob.failure is not None and ob.failure.startswith("disk full")
        assert (ob.count, ob.events_in) == (0, {})
        ob.offer(Event("presence.arrive", {}, "ble"))  # no caller: lost, and counted
        with pytest.raises(DiskFull):
            ob.flush()
        assert ob.events_dropped == {"presence": 1}
    finally:
        filler.unlink()
    done = ob.commit_sync([Event("pos.sale", {"i": 2}, "pos:1")])
    assert done.count == 1 and ob.failure is None and ob.alive
    assert [e["data"] for e in envelopes(ob)] == [{"i": 2}]
    ob.close()


def test_full_disk_in_a_commit_rolls_back_drops_and_recovers(small_fs):
    """SQLITE_FULL in a group that evicted traffic: DiskFull, the traffic is back, no drop is counted."""
    ob = Outbox(small_fs / "buffer.db", max_bytes=1 << 20).start()
    for i in range(60):
        ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad(4000)}, "ble")])
    traffic = ob.count
    assert ob.events_dropped == {}
    # the cap is reached: what comes next needs evictions. It is max_bytes less the WAL's reserve
    # and what the pages and side files take beyond the rows (agent/buffer/footprint.py)
    ob.max_bytes -= ob.footprint.cap - (ob.bytes + 1024)
    assert ob.footprint.cap == ob.bytes + 1024
    filler = fill(small_fs)
    big = [Event("pos.sale", {"txn_id": "R1-9", "pad": pad(200_000)}, "pos:1")]
    try:
        with pytest.raises(DiskFull):
            ob.commit_sync(big)  # needs room under the cap (evicts traffic) and room on disk (none)
        assert ob.alive and ob.failure is not None and ob.failure.startswith("disk full")
        assert ob.events_dropped == {}, "a rolled-back group leaves no drop counters behind"
        assert ob.count == traffic == totals(ob.read_conn()).events
    finally:
        filler.unlink()
    done = ob.commit_sync(big)
    assert done.count == 1 and ob.failure is None
    left = [e["data"]["i"] for e in envelopes(ob) if e["type"] == "traffic.summary"]
    assert ob.events_dropped == {"traffic": traffic - len(left)} and len(left) < traffic
    ob.close()


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def set_immutable(directory: Path, on: bool) -> None:
    """chattr +i / -i: nothing can be created in the directory, not even by root (EPERM)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


def test_unwritable_directory_answers_io_error_and_recovers(small_fs):
    data = small_fs / "data"
    data.mkdir()
    ob = Outbox(data / "buffer.db").start()
    set_immutable(data, True)
    try:
        with pytest.raises(BufferIOError) as exc:
            ob.commit_sync([Event("pos.sale", {"i": 1}, "pos:1")])
        assert exc.value.code == "buffer_io_error" and not isinstance(exc.value, (DiskFull, BufferFull))
        assert ob.alive and ob.failure is not None and ob.failure.startswith("buffer I/O error")
    finally:
        set_immutable(data, False)
    assert ob.commit_sync([Event("pos.sale", {"i": 2}, "pos:1")]).count == 1
    assert ob.failure is None
    ob.close()


def test_corrupt_buffer_is_moved_aside_and_reported(tmp_path):
    path = tmp_path / "buffer.db"
    with Outbox(path) as ob:
        ob.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(5)])
    with open(path, "r+b") as fh:  # scribble over the b-tree pages
        fh.seek(4096)
        fh.write(os.urandom(8192))
    with Outbox(path) as ob:
        assert ob.quarantined is not None and ob.quarantined.startswith("buffer.db.corrupt-")
        assert (tmp_path / ob.quarantined).exists(), "the corrupt file is kept for forensics, never deleted"
        ob.flush()
        got = envelopes(ob)
        assert [e["type"] for e in got] == ["system.buffer_quarantined"]
        assert got[0]["data"]["moved_to"] == ob.quarantined
        assert got[0]["seq"] == 6 + SEQ_LEASE_BLOCK, "seq never goes back, even with a new file"


def test_a_file_that_is_not_a_database_is_quarantined(tmp_path):
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with Outbox(path) as ob:
        ob.flush()
        assert ob.quarantined is not None and ob.quarantined.startswith("buffer.db.corrupt-")
        assert [e["type"] for e in envelopes(ob)] == ["system.buffer_quarantined"]


def test_small_events_cost_little_disk(tmp_path):
    with Outbox(tmp_path / "b.db", tenant="acme", store="sh-0012", agent="till-pc-1") as ob:
        for k in range(40):
            ob.commit_sync(
                [Event("app.checkin", {"member": f"m-{k * 500 + i}"}, "local_api") for i in range(500)]
            )
    size = sum(os.path.getsize(p) for p in tmp_path.iterdir() if p.name.startswith("b.db"))
    assert size / 20_000 <= 120, f"{size / 20_000:.0f} bytes per event"


def test_committed_listener_is_called(outbox):
    calls = []
    outbox.on_committed(lambda: calls.append(1))
    outbox.commit_sync([Event("app.a", {}, "x")])
    assert wait_until(lambda: calls == [1], 10)


def test_acknowledged_deletions_are_written_before_the_backlog_is_read_again(tmp_path, broker):
    """Issue 17: PUBACKed chunks whose deletion still waits for the writer are not sent again on reconnect.

    The writer is held right after the backlog commits (a committed-listener that blocks), so the
    uplink's acknowledgements queue up undeleted. The broker is then killed and restarted: the new
    session must wait for those deletions (flush) before it reads the backlog, and publish nothing.
    """
    from agent.config import parse
    from agent.uplink import Uplink

    cfg = parse(
        f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntls = false\nbackoff_max_s = 0.2\nbatch_size = 50\n'.encode(),
        "test.toml",
    )
    armed, held, release = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        if armed.is_set():
            armed.clear()
            held.set()
            release.wait(30)

    ob = Outbox.from_config(cfg).start()
    uplink = Uplink(cfg, ob)  # registers its own wake-up listener first
    ob.on_committed(hold)
    uplink.start()
    try:
        assert wait_until(lambda: uplink.status.connected, 10)
        armed.set()
        ob.commit_sync([Event("app.a", {"i": i}, "x") for i in range(500)])
        assert held.wait(10)
        assert wait_until(lambda: ob.events_sent.get("app") == 500, 20), "every batch PUBACKed"
        published = uplink.status.published_batches
        assert (published, ob.count) == (10, 500), "acknowledged, not yet deleted"
        broker.kill()
        assert wait_until(lambda: not uplink.status.connected, 10)
        broker.start()
        # a session that reads before flushing would connect now and publish the 500 again
        wait_until(lambda: uplink.status.connected and uplink.status.published_batches > published, 3)
    finally:
        release.set()
    assert wait_until(lambda: uplink.status.connected, 10)
    ob.flush()
    assert (uplink.status.published_batches, ob.count) == (published, 0)
    uplink.stop(1.0)
    ob.close()
