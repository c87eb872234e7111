import os
import sqlite3

import orjson
import pytest

from agent.buffer import ROW_OVERHEAD, Outbox, read_chunks
from agent.core.envelope import EnvelopeError, Event
from agent.sink import BufferFull, Dedup

# The whole data_dir counts toward the cap (footprint.py): about 190 KiB of it is the WAL's
# reserve, the -shm file and the empty schema, so this leaves events about 64 KiB.
SMALL_CAP = 256 * 1024


def envelopes(outbox: Outbox) -> list[dict]:
    chunks = read_chunks(outbox.read_conn(), 0, 1_000_000)
    return [e for c in chunks for e in orjson.loads(b"[" + c.body + b"]")]


@pytest.fixture
def outbox(tmp_path):
    ob = Outbox(tmp_path / "buffer.db", tenant="acme", store="s1", agent="a1", chunk_events=3).open().start()
    yield ob
    ob.close()


def test_commit_is_durable_and_ordered(outbox, tmp_path):
    first = outbox.commit_sync([Event("app.a", {"i": i}, "x") for i in range(7)])
    second = outbox.commit_sync([Event("pos.sale", {"t": 1}, "pos:1")])
    assert list(first.seqs) == list(range(1, 8)) and list(second.seqs) == [8]
    # read with a separate connection: what was acknowledged is in the file
    conn = sqlite3.connect(tmp_path / "buffer.db")
    assert conn.execute("SELECT sum(n) FROM chunks").fetchone()[0] == 8
    assert [c[0] for c in conn.execute("SELECT n FROM chunks ORDER BY seq")] == [3, 3, 1, 1]  # chunk_events=3
    got = envelopes(outbox)
    assert [e["seq"] for e in got] == list(range(1, 9))
    assert [e["id"] for e in got] == first.ids + second.ids
    assert got[0]["data"] == {"i": 0} and got[0]["tenant"] == "acme" and got[0]["agent"] == "a1"
    assert outbox.count == 8


def test_seq_survives_restart(tmp_path):
    ob = Outbox(tmp_path / "b.db").open().start()
    ob.commit_sync([Event("app.a", {}, "x")] * 5)
    ob.acked(read_chunks(ob.read_conn(), 0, 100))  # everything sent and deleted
    ob.close()
    ob = Outbox(tmp_path / "b.db").open().start()
    assert ob.count == 0
    assert list(ob.commit_sync([Event("app.a", {}, "x")]).seqs) == [6]
    ob.close()


def test_a_bad_event_commits_nothing_of_its_request(outbox):
    with pytest.raises(EnvelopeError):
        outbox.commit_sync([Event("app.a", {"ok": 1}, "x"), Event("app.b", {"bad": {1, 2}}, "x")])
    assert outbox.count == 0 and envelopes(outbox) == []
    assert list(outbox.commit_sync([Event("app.a", {}, "x")]).seqs) == [1]


def test_dedup_key_commits_once_and_returns_the_first_result(outbox, tmp_path):
    key = Dedup("pos:R1", "R1-000123", b"first")
    a = outbox.commit_sync([Event("pos.sale", {"txn_id": "R1-000123"}, "pos:1")], key)
    b = outbox.commit_sync([Event("pos.sale", {"txn_id": "R1-000123"}, "pos:1")], Dedup("pos:R1", "R1-000123", b"2"))
    assert not a.duplicate and b.duplicate and b.result == b"first" and b.count == 0
    assert outbox.count == 1
    # another register's same txn_id is another transaction
    c = outbox.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R2", "R1-000123"))
    assert not c.duplicate and outbox.count == 2


def test_dedup_within_one_group(tmp_path):
    """Two commits with the same key in the same transaction: the second sees the first."""
    ob = Outbox(tmp_path / "b.db").open()
    from agent.buffer.writer import _Commit

    results = []
    key = Dedup("api", "k1", b"r")
    ob._run_group(ob._conn, [_Commit([Event("app.a", {}, "x")], key, results.append),
                             _Commit([Event("app.a", {}, "x")], key, results.append)])
    assert not results[0].duplicate and results[1].duplicate and ob.count == 1
    ob.close()


def test_cap_drops_oldest_low_priority_first_and_records_it(tmp_path):
    ob = Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP).open().start()
    pad = "x" * 300
    for i in range(150):
        ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad}, "ble")])
    assert ob.events_dropped["traffic"] > 0, "traffic must have been dropped to stay under the cap"
    assert ob.bytes <= ob.max_bytes
    kept = [e["data"]["i"] for e in envelopes(ob) if e["type"] == "traffic.summary"]
    assert kept == sorted(kept) and kept[-1] == 149, "the oldest go first, the newest stay"
    # POS transactions take the place of traffic, never the other way round
    for i in range(40):
        ob.commit_sync([Event("pos.sale", {"i": i, "pad": pad}, "pos:1")])
    with pytest.raises(BufferFull):
        for i in range(1000):
            ob.commit_sync([Event("pos.sale", {"n": i, "pad": pad}, "pos:1")])
    assert all(e["type"] != "traffic.summary" for e in envelopes(ob))
    pos_kept = [e for e in envelopes(ob) if e["type"] == "pos.sale"]
    assert len(pos_kept) == 40 + i, "no POS transaction was ever dropped"
    ob.close()  # the final group records the drops
    ob = Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP).open().start()
    dropped = [e for e in envelopes(ob) if e["type"] == "system.dropped"]
    assert dropped and sum(d["data"]["streams"]["traffic"] for d in dropped) == 150
    ob.close()


def test_best_effort_offer_is_counted_when_refused(tmp_path):
    ob = Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP).open().start()
    pad = "x" * 500
    with pytest.raises(BufferFull):
        for _ in range(1000):
            ob.commit_sync([Event("pos.sale", {"pad": pad}, "pos:1")])
    ob.offer(Event("presence.arrive", {"pad": pad}, "ble"))
    ob.flush()
    assert ob.events_dropped["presence"] == 1
    ob.close()


def test_acked_chunks_are_deleted_and_accounted(outbox):
    outbox.commit_sync([Event("app.a", {"i": i}, "x") for i in range(10)])
    chunks = read_chunks(outbox.read_conn(), 0, 2)
    outbox.acked(chunks)
    outbox.flush()
    assert outbox.count == 10 - sum(c.n for c in chunks)
    assert outbox.events_sent["app"] == 6
    total = sum(len(c.body) + ROW_OVERHEAD for c in read_chunks(outbox.read_conn(), 0, 100))
    assert outbox.bytes == total


def test_a_chunk_dropped_by_the_cap_while_in_flight_is_not_counted_twice(tmp_path):
    ob = Outbox(tmp_path / "b.db", max_bytes=SMALL_CAP).open().start()
    pad = "x" * 300
    ob.commit_sync([Event("traffic.summary", {"i": -1, "pad": pad}, "ble")])
    in_flight = read_chunks(ob.read_conn(), 0, 1)  # the uplink has read (and published) it
    for i in range(300):  # the cap drops the oldest traffic, the chunk in flight among them
        ob.commit_sync([Event("traffic.summary", {"i": i, "pad": pad}, "ble")])
    assert in_flight[0].seq not in [c.seq for c in read_chunks(ob.read_conn(), 0, 10_000)]
    ob.acked(in_flight)  # its PUBACK arrives after the cap dropped it
    ob.flush()
    rows = read_chunks(ob.read_conn(), 0, 10_000)
    assert ob.count == sum(c.n for c in rows)
    assert ob.bytes == sum(len(c.body) + ROW_OVERHEAD for c in rows)
    ob.close()


def test_corrupt_buffer_is_moved_aside_and_reported(tmp_path):
    path = tmp_path / "buffer.db"
    ob = Outbox(path).open().start()
    ob.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(5)])
    ob.close()
    with open(path, "r+b") as fh:  # scribble over the b-tree pages
        fh.seek(4096)
        fh.write(os.urandom(8192))
    ob = Outbox(path).open().start()
    assert ob.quarantined is not None
    assert (tmp_path / ob.quarantined).exists(), "the corrupt file is kept for forensics, never deleted"
    ob.flush()
    got = envelopes(ob)
    assert [e["type"] for e in got] == ["system.buffer_quarantined"]
    assert got[0]["data"]["moved_to"] == ob.quarantined
    assert got[0]["seq"] > 5, "seq never goes back, even with a new file"
    ob.close()


def test_a_file_that_is_not_a_database_is_quarantined(tmp_path):
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not sqlite" * 100)
    ob = Outbox(path).open().start()
    ob.flush()
    assert ob.quarantined and [e["type"] for e in envelopes(ob)] == ["system.buffer_quarantined"]
    ob.close()


def test_small_events_cost_little_disk(tmp_path):
    ob = Outbox(tmp_path / "b.db", tenant="acme", store="sh-0012", agent="till-pc-1").open().start()
    for _ in range(40):
        ob.commit_sync([Event("app.checkin", {"member": "m1"}, "local_api") for _ in range(500)])
    ob.close()
    size = sum(os.path.getsize(p) for p in tmp_path.iterdir() if p.name.startswith("b.db"))
    assert size / 20_000 <= 300, f"{size / 20_000:.0f} bytes per event"


def test_committed_listener_is_called(outbox):
    calls = []
    outbox.on_committed(lambda: calls.append(1))
    outbox.commit_sync([Event("app.a", {}, "x")])
    assert calls
