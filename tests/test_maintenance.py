from agent.buffer import read_chunks
from agent.buffer.maintenance import POS_KEEP_S, hourly
from agent.core.envelope import Event
from agent.sink import Dedup
from tests.support.buffer import open_outbox

DAY = 86400.0


def test_pos_keys_are_kept_7_days_after_their_event_was_sent(tmp_path):
    clock = [1_000_000.0]
    with open_outbox(tmp_path / "b.db", clock=lambda: clock[0]) as ob:
        ob.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R1", "T1"))
        ob.commit_sync([Event("pos.invalid", {}, "pos:1")], Dedup("pos-invalid:front-1", "sha256-of-payload"))
        ob.call(lambda c: hourly(c, clock[0]))  # T1 not sent yet: the watermark does not cover it
        clock[0] += 10 * DAY  # offline for 10 days
        ob.call(lambda c: hourly(c, clock[0]))
        assert ob.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R1", "T1")).duplicate
        ob.acked(read_chunks(ob.read_conn(), 0, 10))  # now it is sent
        ob.flush()
        clock[0] += 3600
        ob.call(lambda c: hourly(c, clock[0]))  # watermark: sent by now
        clock[0] += POS_KEEP_S - 7200  # not yet 7 days after sending
        ob.call(lambda c: hourly(c, clock[0]))
        assert ob.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R1", "T1")).duplicate
        clock[0] += 2 * 3600
        result = ob.call(lambda c: hourly(c, clock[0]))
        assert result["pos_keys_pruned"] == 2  # the transaction's key and the invalid frame's
        assert not ob.commit_sync([Event("pos.sale", {}, "pos:1")], Dedup("pos:R1", "T1")).duplicate


def test_api_keys_go_after_48_hours(tmp_path):
    clock = [1_000_000.0]
    with open_outbox(tmp_path / "b.db", clock=lambda: clock[0]) as ob:
        ob.commit_sync([Event("app.x", {}, "api")], Dedup("api", "k", b"0" * 64 + b"[]"))
        clock[0] += 47 * 3600
        assert ob.call(lambda c: hourly(c, clock[0]))["api_keys_pruned"] == 0
        clock[0] += 2 * 3600
        assert ob.call(lambda c: hourly(c, clock[0]))["api_keys_pruned"] == 1
