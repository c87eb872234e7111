"""kill -9 of the agent while commands are between receipt and reply: none runs twice, none is lost.

A burst of commands; the agent is killed once the first replies are out, so others are received,
executing, recorded or replied at that instant. The cloud sends every id again to the restarted
agent (a cloud retries a command it has no reply to; the agent's session is clean, so the broker
keeps nothing for it). Every id is then answered; an id answered before the kill is answered
again with the very same bytes (its stored reply: nothing ran again), every id has one row and
exactly one `command.*` event.
"""

from __future__ import annotations

import sqlite3
import uuid

import orjson

from tests.support.agentproc import AgentProcess, write_config
from tests.support.commander import Commander
from tests.support.subscriber import Collector
from tests.support.wait import wait_until

N = 120


def test_kill9_between_receipt_and_reply_runs_none_twice_and_loses_none(tmp_path, broker):
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "data", broker.port)
    events = Collector(broker.port, "retail/acme/s1/a1/up/#", client_id="events").start()
    cloud = Commander(broker.port).start()
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    ids = [str(uuid.uuid4()) for _ in range(N)]
    try:
        assert cloud.wait_serving(), agent.tail()
        for cid in ids:
            cloud.send("status", {"id": cid})
        assert wait_until(lambda: len(cloud.replies) >= 5, 20)
        agent.kill9()
        with cloud.lock:
            first = {
                orjson.loads(p)["id"]: p
                for t, p, _c, _a in cloud.replies
                if t.endswith("/reply") and not orjson.loads(p)["id"].startswith("probe-")
            }
        assert 0 < len(first) < N, "the kill came after every reply: no command was caught in flight"

        agent.start()
        assert cloud.wait_serving(), agent.tail()
        for cid in ids:
            cloud.send("status", {"id": cid})
        assert wait_until(lambda: all(cloud.on("/reply", cid) for cid in ids), 60), agent.tail()
        for cid, payload in first.items():
            assert set(cloud.on("/reply", cid)) == {payload}, "a command answered before the kill ran again"

        def one_event_each() -> bool:
            with events.lock:
                unique = {e["id"]: e for e in events.events if e["type"].startswith("command.")}
            per_id = [e["data"]["id"] for e in unique.values()]
            return sorted(i for i in per_id if not i.startswith("probe-")) == sorted(ids)

        assert events.wait_for(lambda c: one_event_each(), 30)
        agent.stop()
        conn = sqlite3.connect(tmp_path / "data" / "buffer.db")
        try:
            assert conn.execute(
                "SELECT count(*), count(DISTINCT id) FROM commands WHERE id NOT LIKE 'probe-%'"
            ).fetchone() == (N, N)
        finally:
            conn.close()
    finally:
        agent.kill()
        cloud.stop()
        events.stop()
