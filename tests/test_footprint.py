"""The buffer's footprint on disk (issue 12): WAL bounded, the whole data_dir within max_bytes,
what deletes leave behind, and the full check only after an unclean stop. Real files throughout."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.buffer import ROW_OVERHEAD, Outbox, read_chunks
from agent.buffer.footprint import data_dir_bytes, overwriting_deletes, truncate_wal, wal_bound, wal_path
from agent.buffer.idempotency import NAMESPACE, stored_result
from agent.core.envelope import Event
from agent.sink import BufferFull, Dedup
from tests.support.agentproc import AgentProcess, write_config
from tests.support.buffer import open_outbox, prefill
from tests.support.mosquitto import free_port
from tests.support.wait import wait_until


def events(n: int, start: int = 0, pad: int = 200) -> list[Event]:
    """Events with `pad` characters of random hex: bodies are stored compressed, and these must
    not shrink to nothing (the WAL, the pages and the cap are what these tests are about)."""
    return [
        Event("app.checkin", {"i": start + i, "pad": os.urandom(pad // 2).hex()}, "tablet") for i in range(n)
    ]


def drain(outbox: Outbox, step: int = 50) -> None:
    while chunks := read_chunks(outbox.read_conn(), 0, step):
        outbox.acked(chunks)
        outbox.flush()


def test_writer_connection_runs_fast_secure_delete_and_a_wal_size_limit(tmp_path: Path) -> None:
    with open_outbox(tmp_path / "buffer.db", max_bytes=1 << 30) as ob:
        pragmas = ob.call(
            lambda conn: [
                conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("secure_delete", "journal_size_limit")
            ]
        )
        assert pragmas == [2, 16 << 20] and wal_bound(1 << 30) == 16 << 20  # 2: FAST


def test_wal_is_truncated_when_the_buffer_drains(tmp_path: Path) -> None:
    with open_outbox(tmp_path / "buffer.db") as ob:
        for i in range(0, 20_000, 500):
            ob.commit_sync(events(500, i))
        assert wal_path(ob.path).stat().st_size > 1 << 20
        drain(ob, step=40)
        assert ob.count == 0
        assert wal_path(ob.path).stat().st_size == 0
        assert ob.footprint.truncations >= 1


def test_wal_stays_within_its_bound_while_readers_keep_it_busy(tmp_path: Path) -> None:
    """Readers nearly always inside a transaction (as the uplink is during a drain) keep SQLite
    from restarting the WAL; it grew without end (695 MB at 5M) until the writer truncated it."""
    cap = 8 << 20
    with open_outbox(tmp_path / "buffer.db", max_bytes=cap) as ob:
        stop = threading.Event()

        def reader() -> None:
            conn = sqlite3.connect(ob.path, isolation_level=None)
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT count(*) FROM chunks").fetchone()
                stop.wait(0.002)
                conn.execute("COMMIT")
                time.sleep(0.001)
            conn.close()

        thread = threading.Thread(target=reader)
        thread.start()
        biggest = 0
        try:
            for round_ in range(6):
                for i in range(0, 5_000, 250):
                    ob.commit_sync(events(250, round_ * 10_000 + i, pad=400))
                    biggest = max(biggest, wal_path(ob.path).stat().st_size)
                drain(ob, step=5)
                biggest = max(biggest, wal_path(ob.path).stat().st_size)
        finally:
            stop.set()
            thread.join()
    assert biggest <= 2 * wal_bound(cap), biggest  # the reserve the cap keeps for it


def test_idempotency_keys_alone_fill_the_cap_and_are_refused(tmp_path: Path) -> None:
    """100k keys of empty requests took 37.7 MB outside the cap: each key now counts."""
    cap = 1 << 20

    def key(i: int) -> Dedup:
        digest = hashlib.sha256(f"{i}".encode()).hexdigest().encode()
        return Dedup(NAMESPACE, f"key-{i:08d}-{'k' * 40}", stored_result(digest))

    with open_outbox(tmp_path / "data" / "buffer.db", max_bytes=cap) as ob:
        taken = 0
        with concurrent.futures.ThreadPoolExecutor(32) as pool:  # 32 at a time: group commits
            for start in range(0, 100_000, 32):
                outcomes = list(pool.map(lambda i: _try(ob, key(i)), range(start, start + 32)))
                taken += sum(outcomes)
                if not all(outcomes):
                    break
        assert 1000 < taken < 100_000  # keys were taken until the cap, then refused
        assert data_dir_bytes(tmp_path / "data") <= cap
        assert ob.commit_sync([], key(0)).duplicate  # a retry of a stored key needs no room
    assert data_dir_bytes(tmp_path / "data") <= cap


def _try(ob: Outbox, dedup: Dedup) -> bool:
    try:
        ob.commit_sync([], dedup)
    except BufferFull:
        return False
    return True


def test_data_dir_stays_within_max_bytes_through_fill_and_drain(tmp_path: Path) -> None:
    cap = 4 << 20
    data = tmp_path / "data"
    peak = 0
    with open_outbox(data / "buffer.db", max_bytes=cap) as ob:
        for round_ in range(2):
            taken = 0
            with pytest.raises(BufferFull):
                for i in range(0, 1_000_000, 100):
                    ob.commit_sync(events(100, round_ * 1_000_000 + i))
                    taken += 100
                    peak = max(peak, data_dir_bytes(data))
            assert taken > 5_000  # the events had most of the cap
            while chunks := read_chunks(ob.read_conn(), 0, 3):
                ob.acked(chunks)
                ob.flush()
                peak = max(peak, data_dir_bytes(data))
            assert ob.count == 0 and wal_path(ob.path).stat().st_size <= wal_bound(cap)
    assert peak <= cap, peak
    assert data_dir_bytes(data) <= cap


def test_ordinary_deletes_leave_big_bodies_in_free_pages_erasure_overwrites_them(tmp_path: Path) -> None:
    """What remains on disk after a PUBACK (README): FAST zeroes rows inside b-tree pages but a
    chunk's overflow pages keep their bytes until reused; `overwriting_deletes` leaves nothing.

    Bodies are stored compressed, so what is looked for on disk is a piece of the stored body
    (from its middle: an overflow page), not the events' text; the random text keeps the chunk
    big enough to need overflow pages once compressed."""

    def stored_after_delete(erase: bool) -> bool:
        path = tmp_path / f"{erase}.db"
        with open_outbox(path) as ob:  # its close checkpoints the WAL into the file and truncates it
            ob.commit_sync(
                [Event("app.note", {"n": i, "who": os.urandom(100).hex()}, "x") for i in range(100)]
            )
            (stored,) = ob.read_conn().execute("SELECT body FROM chunks").fetchone()
            assert len(stored) > 2 * 4096  # its middle is in an overflow page
            secret = bytes(stored[len(stored) // 2 : len(stored) // 2 + 64])
            chunks = read_chunks(ob.read_conn(), 0, 100)
            if erase:

                def erase_rows(conn: sqlite3.Connection) -> None:
                    with overwriting_deletes(conn):
                        conn.executemany("DELETE FROM chunks WHERE seq=?", [(c.seq,) for c in chunks])

                ob.call(erase_rows)
                ob.call(lambda conn: None)
            else:
                ob.acked(chunks)
                ob.flush()
        assert not wal_path(path).exists() or wal_path(path).stat().st_size == 0
        return secret in path.read_bytes()

    assert stored_after_delete(erase=False)
    assert not stored_after_delete(erase=True)


def test_truncate_wal_gives_up_on_a_reader_that_holds_on(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_outbox(path) as ob:
        ob.commit_sync(events(10))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("DELETE FROM chunks")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM chunks").fetchone()
    try:
        assert not truncate_wal(writer, busy_ms=50)
    finally:
        reader.execute("COMMIT")
    assert truncate_wal(writer, busy_ms=50) and wal_path(path).stat().st_size == 0
    reader.close()
    writer.close()


# ---- start-up: the full check only after an unclean stop -----------------------------------------


def test_a_clean_close_skips_the_full_check_and_an_unclean_one_does_not(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_outbox(path) as ob:
        ob.commit_sync(events(10))
    again = Outbox(path).open()
    assert not again.checked_fully and again.checked.is_set() and again.count == 10
    # the totals recorded at the clean close are those a full count finds
    assert again.bytes == sum(c.stored + ROW_OVERHEAD for c in read_chunks(again.read_conn(), 0, 100)) > 0
    # the marker is gone while the file is open: a crash now means a full check next time
    crashed = Outbox(path).open()
    assert crashed.checked_fully and crashed.count == 10
    crashed.close()
    again.close()


def test_a_clean_close_at_the_cap_still_skips_the_full_check(tmp_path: Path) -> None:
    """A refusal at the cap is no failed write: the file is sound, and a buffer at its cap (a long
    outage, the biggest file) is where the full check costs the most."""
    path = tmp_path / "buffer.db"
    ob = Outbox(path, max_bytes=1 << 20).open().start()
    with pytest.raises(BufferFull):
        for i in range(0, 100_000, 100):
            ob.commit_sync([Event("pos.sale", e.data, "pos:1") for e in events(100, i, pad=400)])
    assert ob.failure is not None  # still refusing when it is stopped
    ob.close()
    again = Outbox(path, max_bytes=1 << 20).open()
    try:
        assert not again.checked_fully and again.count == ob.count
    finally:
        again.close()


def test_a_file_changed_after_a_clean_stop_is_checked_and_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_outbox(path) as ob:
        ob.commit_sync(events(2000))
    with open(path, "r+b") as fh:  # scribble over b-tree pages while the agent is stopped
        fh.seek(4096 * 2)
        fh.write(os.urandom(4096 * 3))
    with open_outbox(path) as ob:
        assert ob.checked_fully and ob.quarantined is not None
        assert (tmp_path / ob.quarantined).exists()  # moved aside, never deleted


def test_agent_runs_the_full_check_after_kill_9_not_after_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prefill(data, events(1000))  # closed cleanly by the prefill
    config = write_config(tmp_path / "agent.toml", data, None)
    skipped, checked = "closed cleanly: full check skipped", "quick_check ok"
    runs = []
    for how in ("stop", "kill", "stop"):
        log = tmp_path / f"agent-{len(runs)}.log"
        agent = AgentProcess(config, log).start()
        try:
            assert agent.wait_log("running:"), agent.log_text()
        finally:
            if how == "kill":
                agent.kill()
            else:
                assert agent.stop() == 0
        runs.append(agent.log_text())
    last = AgentProcess(config, tmp_path / "agent-last.log").start()
    try:
        assert last.wait_log("running:"), last.log_text()
    finally:
        last.stop()
    runs.append(last.log_text())
    # 1st start: after the prefill's clean close; 2nd: after a SIGTERM; 3rd: after kill -9; 4th: SIGTERM
    assert [skipped in r for r in runs] == [True, True, False, True], runs
    assert [checked in r for r in runs] == [False, False, True, False], runs
    assert wait_until(lambda: (data / "buffer.db.clean").exists(), 5)


def test_agent_answers_503_when_idempotency_keys_alone_reach_the_cap(tmp_path: Path) -> None:
    """Through the real local API: empty requests, each with a new key, until the cap says 503."""
    cap = 1 << 20
    data = tmp_path / "data"
    (tmp_path / "token").write_text("t0ken-for-the-footprint-test\n")
    port = free_port()
    extra = f'token_file = "{tmp_path / "token"}"\n[buffer]\nmax_bytes = {cap}\n'
    agent = AgentProcess(
        write_config(tmp_path / "agent.toml", data, None, extra, api_port=port), tmp_path / "a.log"
    )
    agent.start()
    headers = {"Authorization": "Bearer t0ken-for-the-footprint-test", "Content-Type": "application/json"}
    try:
        assert agent.wait_log("running:"), agent.log_text()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses: list[int] = []
        for i in range(20_000):
            conn.request("POST", "/v1/events", b"[]", {**headers, "Idempotency-Key": f"{i:06d}-" + "k" * 240})
            response = conn.getresponse()
            body = response.read()
            statuses.append(response.status)
            if response.status != 200:
                break
        assert statuses[-1] == 503 and b"buffer_full" in body, (statuses[-3:], body)
        assert len(statuses) > 500  # keys were stored until the cap, not refused from the start
        assert data_dir_bytes(data) <= cap
        conn.close()
    finally:
        agent.stop()
    assert data_dir_bytes(data) <= cap


def test_the_uplink_sends_nothing_before_the_file_is_checked(tmp_path: Path, broker) -> None:
    from agent.config import parse
    from agent.uplink import Uplink
    from tests.support.subscriber import Collector

    cfg = parse(
        f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{tmp_path}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntls = false\nbackoff_max_s = 0.5\n'.encode(),
        "test.toml",
    )
    with open_outbox(cfg.buffer_path, tenant="acme", store="s1", agent="a1") as ob:
        ob.commit_sync(events(5))
        ob.checked.clear()  # as if the check had not passed yet
        collector = Collector(broker.port, "retail/#").start()
        uplink = Uplink(cfg, ob).start()
        try:
            assert not collector.wait_for(lambda c: len(c.messages) > 0, 1.0)  # not even the online state
            assert uplink.alive and not uplink.status.connected and ob.count == 5
            ob.checked.set()
            assert collector.wait_for(lambda c: len(c.events) == 5, 20)
            assert wait_until(lambda: ob.count == 0, 10)
        finally:
            uplink.stop(1.0)
            collector.stop()
