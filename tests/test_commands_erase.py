"""`erase_subject` on a real buffer file: what is erased is gone from the file's bytes, the rest stays.

In process (a real Outbox on a real SQLite file, the real command channel; the uplink is built but
not connected: the reply is read from the stored row, which is what the uplink publishes).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import sqlite3
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import logsetup
from agent.buffer import Outbox
from agent.buffer.reader import totals
from agent.buffer.writer import CallResult
from agent.commands import store
from agent.commands.channel import CommandChannel
from agent.config import parse
from agent.core.envelope import Event, priority_of
from agent.health import HealthBoard
from agent.status import StatusReporter
from agent.uplink import Uplink
from tests.support.buffer import stored_events
from tests.support.commander import sign

KEY = Ed25519PrivateKey.generate()
PUB = base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
MEMBER = "M-SECRET-4711"
TOKEN = "tok-Ω-9f3e"
LEGACY_SEQ = 10**9
TOPIC = "retail/acme/s1/a1/cmd/erase_subject"


def pad(rng: random.Random, chars: int = 3000) -> str:
    """Incompressible text (CJK code points at random): big chunks, overflow pages."""
    return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(chars))


def file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def windows_gone(old: bytes, new: bytes, size: int = 32) -> list[bytes]:
    """Slices of the old stored body that the rewritten one does not hold (what must be overwritten)."""
    return [old[i : i + size] for i in range(0, len(old) - size, size) if old[i : i + size] not in new]


def make_channel(tmp_path: Path) -> tuple[Outbox, CommandChannel]:
    cfg = parse(
        (
            f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[commands.public_keys]\nops = "{PUB}"\n'
        ).encode(),
        "agent.toml",
        environ={},
    )
    outbox = Outbox.from_config(cfg).start()
    uplink = Uplink(cfg, outbox)
    reporter = StatusReporter(outbox, uplink, HealthBoard())
    return outbox, CommandChannel(cfg, outbox, uplink, reporter)


def erase_payload(cid: str, **args: str) -> bytes:
    msg = sign(KEY, "ops", "erase_subject", {"id": cid, "expires": "2099-01-01T00:00:00Z", "args": args})
    return json.dumps(msg, ensure_ascii=False).encode()


def test_erase_overwrites_on_disk_and_keeps_the_chunks_other_events(tmp_path):
    rng = random.Random(7)
    outbox, channel = make_channel(tmp_path)
    db = outbox.path
    try:
        sales = [
            Event(
                "pos.sale",
                {"txn": i, "member_id": MEMBER if i % 4 == 0 else f"m{i}", "pad": pad(rng)},
                "pos:1",
            )
            for i in range(12)
        ]
        checkin = Event("app.checkin", {"who": {"list": [{"token": TOKEN}]}, "pad": pad(rng)}, "app")
        ids = outbox.commit_sync([*sales, checkin]).ids
        # a row as older agents stored it (raw JSON): the member id is literally in the file
        legacy = b",".join(
            orjson.dumps(
                {
                    "id": f"legacy-{i}",
                    "seq": LEGACY_SEQ + i,
                    "type": "pos.sale",
                    "data": {"member_id": MEMBER if i == 0 else "x", "pad": pad(rng)},
                }
            )
            for i in range(2)
        )
        outbox.call(
            lambda conn: CallResult(
                conn.execute(
                    "INSERT INTO chunks(seq, n, stream, prio, body) VALUES(?,?,?,?,?)",
                    (LEGACY_SEQ, 2, "pos", priority_of("pos"), legacy),
                ).rowcount,
                removed_events=-2,
                removed_bytes=-(len(legacy) + 24),
            )
        )
        conn = outbox.read_conn()
        (old_sales,) = conn.execute(
            "SELECT body FROM chunks WHERE stream='pos' AND seq < ?", (LEGACY_SEQ,)
        ).fetchone()
        before = stored_events(outbox)
        assert MEMBER.encode() in file_bytes(db)

        channel.handle(TOPIC, erase_payload("erase-1", member_id=MEMBER, token=TOKEN), None, None)

        rec = store.lookup(outbox.read_conn(), "erase-1")
        assert rec is not None and orjson.loads(rec.reply) == {
            "id": "erase-1",
            "ok": True,
            "result": {"erased": 5},
        }
        after = stored_events(outbox)
        erased = {ids[0], ids[4], ids[8], ids[12], "legacy-0"}
        assert [e for e in before if e["id"] not in erased] == [
            e for e in after if e["type"] != "command.executed"
        ]
        (event,) = [e for e in after if e["type"] == "command.executed"]
        assert event["data"] == {"id": "erase-1", "name": "erase_subject", "ok": True}
        # the writer's accounts follow the rewrite
        held = totals(outbox.read_conn())
        assert (outbox.count, outbox.bytes) == (held.events, held.bytes)
        # overwritten, not only unlinked: neither the member id (raw row) nor the compressed bytes
        # that held the erased sales are anywhere in the file or its WAL
        (new_sales,) = conn.execute(
            "SELECT body FROM chunks WHERE stream='pos' AND seq < ?", (LEGACY_SEQ,)
        ).fetchone()
        gone = windows_gone(bytes(old_sales), bytes(new_sales))
        assert len(gone) > 100
        on_disk = file_bytes(db)
        assert MEMBER.encode() not in on_disk
        assert TOKEN.encode() not in on_disk
        assert [w for w in gone if w in on_disk] == []
    finally:
        outbox.close()


def test_a_repeated_erase_runs_nothing_and_gets_the_stored_reply(tmp_path):
    outbox, channel = make_channel(tmp_path)
    try:
        outbox.commit_sync([Event("pos.sale", {"member_id": MEMBER}, "pos:1")])
        payload = erase_payload("erase-2", member_id=MEMBER)
        channel.handle(TOPIC, payload, None, None)
        first = store.lookup(outbox.read_conn(), "erase-2")
        later = outbox.commit_sync([Event("pos.sale", {"member_id": MEMBER}, "pos:1")]).ids[0]
        channel.handle(TOPIC, payload, None, None)
        assert store.lookup(outbox.read_conn(), "erase-2") == first
        assert orjson.loads(first.reply)["result"] == {"erased": 1}
        assert later in {e["id"] for e in stored_events(outbox)}  # the repeat erased nothing
        events = [e for e in stored_events(outbox) if e["type"].startswith("command.")]
        assert len(events) == 1
        assert channel.reporter.commands == {("erase_subject", "ok"): 1}
    finally:
        outbox.close()


def test_unsigned_erase_is_forbidden_and_erases_nothing(tmp_path):
    outbox, channel = make_channel(tmp_path)
    try:
        ids = outbox.commit_sync([Event("pos.sale", {"member_id": MEMBER}, "pos:1")]).ids
        channel.handle(
            TOPIC,
            json.dumps(
                {"id": "erase-3", "expires": "2099-01-01T00:00:00Z", "args": {"member_id": MEMBER}}
            ).encode(),
            None,
            None,
        )
        rec = store.lookup(outbox.read_conn(), "erase-3")
        assert rec is not None and rec.code == "forbidden"
        assert ids[0] in {e["id"] for e in stored_events(outbox)}
    finally:
        outbox.close()


def test_log_ring_keeps_lines_and_never_a_secret(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("hunter2-password\n")
    from agent.config import read_secret

    assert read_secret(secret_file) == "hunter2-password"
    logging.getLogger("agent.test").error("connecting with hunter2-password failed")
    ring = logsetup.RingHandler()
    ring.setFormatter(logsetup.LogfmtFormatter())
    logger = logging.getLogger("agent.test.ring")
    logger.addHandler(ring)
    logger.propagate = False
    try:
        logger.error("url mqtt://u:hunter2-password@host")
        logger.error("second")
    finally:
        logger.removeHandler(ring)
    assert ring.tail(5) == [
        'level=error logger=agent.test.ring msg="url mqtt://u:***@host"',
        'level=error logger=agent.test.ring msg="second"',
    ]
    assert ring.tail(1) == ['level=error logger=agent.test.ring msg="second"']


def test_commands_ids_are_pruned_after_seven_days(tmp_path):
    from agent.buffer.maintenance import hourly

    outbox, _channel = make_channel(tmp_path)
    try:
        rec = store.Stored("old", "status", True, None, b"{}", None, None)
        outbox.call(lambda conn: store.insert(conn, rec, 1000.0))
        outbox.call(
            lambda conn: store.insert(
                conn, store.Stored("new", "status", True, None, b"{}", None, None), 1000.0 + 7 * 86400
            )
        )
        result = outbox.call(lambda conn: hourly(conn, 1000.0 + 7 * 86400 + 1))
        assert result["command_ids_pruned"] == 1
        conn = sqlite3.connect(outbox.path)
        assert [r[0] for r in conn.execute("SELECT id FROM commands")] == ["new"]
        conn.close()
    finally:
        outbox.close()


def test_events_committed_after_the_scan_are_erased_too(tmp_path):
    """The buffer is scanned outside the writer; what is committed between that scan and the
    erasing transaction is looked at in the transaction, so nothing carrying the subject escapes."""
    from agent.commands.erase import candidates, erase

    outbox, _channel = make_channel(tmp_path)
    try:
        ids = outbox.commit_sync(
            [
                Event("pos.sale", {"member_id": MEMBER}, "pos:1"),
                Event("pos.sale", {"member_id": "other"}, "pos:1"),
            ]
        ).ids
        seqs, after = candidates(outbox.read_conn(), MEMBER, None)
        late = outbox.commit_sync([Event("app.checkin", {"member_id": MEMBER}, "app")]).ids
        result = outbox.call(lambda conn: erase(conn, MEMBER, None, seqs, after))
        assert result == 2
        assert [e["id"] for e in stored_events(outbox)] == [ids[1]]
        assert late[0] not in {e["id"] for e in stored_events(outbox)}
        assert outbox.count == 1
    finally:
        outbox.close()
