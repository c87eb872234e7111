"""The command channel end to end: a real agent process, a real mosquitto, a real MQTT 5 "cloud".

One agent serves the module's tests (its config requires signatures for `erase_subject` under a
test key); each test uses ids of its own.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.agentproc import AgentProcess, toml_table, write_config
from tests.support.commander import Commander, sign
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector

KEY = Ed25519PrivateKey.generate()
PUB = base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
FUTURE = "2099-01-01T00:00:00Z"


class Rig:
    def __init__(self, broker: Mosquitto, agent: AgentProcess, cloud: Commander, events: Collector, api: int):
        self.broker, self.agent, self.cloud, self.events, self.api = broker, agent, cloud, events, api

    def command_events(self, cid: str) -> list[dict]:
        with self.events.lock:
            return [
                e for e in self.events.events if e["type"].startswith("command.") and e["data"]["id"] == cid
            ]

    def metric(self, name: str, outcome: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.api}/metrics", timeout=5).text
        m = re.search(rf'store_agent_commands_total\{{name="{name}",outcome="{outcome}"\}} (\S+)', text)
        return float(m.group(1)) if m else 0.0


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("commands")
    broker = Mosquitto(tmp / "mq").start()
    api = free_port()
    (tmp / "token").write_text("t0ken-secret\n")  # a secret the agent reads: never in a log line
    cfg = write_config(tmp / "agent.toml", tmp / "data", broker.port, api_port=api)
    text = cfg.read_text().replace("[local_api]\n", f'[local_api]\ntoken_file = "{tmp / "token"}"\n')
    cfg.write_text(text + toml_table("commands", {}) + toml_table("commands.public_keys", {"ops": PUB}))
    events = Collector(broker.port, "retail/acme/s1/a1/up/#", client_id="events").start()
    agent = AgentProcess(cfg, tmp / "agent.log").start()
    cloud = Commander(broker.port).start()
    try:
        assert cloud.wait_serving(), agent.tail()
        yield Rig(broker, agent, cloud, events, api)
    finally:
        cloud.stop()
        events.stop()
        agent.stop()
        broker.stop()


def test_status_replies_with_the_status_object_and_one_event(rig):
    cid = new_id()
    rig.cloud.send("status", {"id": cid, "args": {}})
    reply = rig.cloud.wait_reply(cid)
    assert reply["ok"] is True and reply["id"] == cid
    assert {"version", "connection", "buffer", "devices"} <= set(reply["result"])
    assert rig.events.wait_for(lambda c: rig.command_events(cid), 20)
    (event,) = rig.command_events(cid)
    assert event["type"] == "command.executed" and event["data"] == {"id": cid, "name": "status", "ok": True}


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("set_label", {"args": {"label": "L1", "price": "1.00"}}, "unknown_command"),
        ("update_config", {"args": {"toml": ""}}, "unknown_command"),
        ("erase_subject", {"expires": FUTURE, "args": {"token": "t"}}, "forbidden"),  # no sig
        (
            "erase_subject",
            {"expires": FUTURE, "args": {"token": "t"}, "sig": {"key": "ops", "value": "%%%bad base64%%%"}},
            "forbidden",
        ),
        ("status", {"expires": "2020-01-01T00:00:00Z"}, "expired"),
        ("set_log_level", {"args": {"level": "loud"}}, "invalid_args"),
        ("set_log_level", {"args": {"level": 10}}, "invalid_args"),  # wrong type
        ("drain", {"args": {"force": True}}, "invalid_args"),  # unknown key
    ],
)
def test_each_refusal_code_over_the_wire(rig, name, body, expected):
    cid = new_id()
    rig.cloud.send(name, {"id": cid, **body})
    reply = rig.cloud.wait_reply(cid)
    assert reply["ok"] is False and reply["error"]["code"] == expected, reply
    assert rig.events.wait_for(lambda c: rig.command_events(cid), 20)
    (event,) = rig.command_events(cid)
    assert event["type"] == "command.refused"
    assert event["data"] == {"id": cid, "name": name, "ok": False, "code": expected}


def test_signed_erase_with_non_ascii_args_runs(rig):
    cid = new_id()
    rig.cloud.send(
        "erase_subject",
        sign(KEY, "ops", "erase_subject", {"id": cid, "expires": FUTURE, "args": {"member_id": "会员-Ω-ß"}}),
    )
    reply = rig.cloud.wait_reply(cid)
    assert reply == {"id": cid, "ok": True, "result": {"erased": 0}}


def test_repeat_gets_the_stored_reply_byte_identical_and_runs_nothing(rig):
    cid = new_id()
    before = rig.metric("set_log_level", "ok")
    rig.cloud.send("set_log_level", {"id": cid, "args": {"level": "debug"}})
    rig.cloud.wait_reply(cid)
    first = rig.cloud.on("/reply", cid)[0]
    rig.cloud.send("set_log_level", {"id": cid, "args": {"level": "debug"}})
    rig.cloud.send("set_log_level", {"id": cid, "args": {"level": "error"}})  # same id, other args: no matter
    assert rig.events.wait_for(lambda c: rig.command_events(cid), 20)
    assert rig.cloud.wait_reply(cid) and _wait(lambda: len(rig.cloud.on("/reply", cid)) >= 3)
    assert set(rig.cloud.on("/reply", cid)) == {first}
    assert rig.agent.wait_log(f"command {cid} (set_log_level) seen before")
    assert rig.agent.log_text().count(f"command {cid} (set_log_level) done") == 1
    # a later command shows the events flowing; still exactly one event and one count for the id
    probe = new_id()
    rig.cloud.send("status", {"id": probe})
    assert rig.events.wait_for(lambda c: rig.command_events(probe), 20)
    assert len(rig.command_events(cid)) == 1
    assert rig.metric("set_log_level", "ok") == before + 1
    rig.cloud.send("set_log_level", {"id": new_id(), "args": {"level": "info"}})


def test_hostile_payloads_get_the_contracts_answer_and_the_agent_serves_on(rig):
    big = new_id()
    rig.cloud.send(
        "status", b'{"id": "' + big.encode() + b'", "args": {"pad": "' + b"x" * (10 << 20) + b'"}}'
    )
    assert rig.cloud.wait_reply(big)["error"]["code"] == "invalid_args"
    deep = new_id()
    rig.cloud.send(
        "status", b'{"id": "' + deep.encode() + b'", "args": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    )
    assert rig.cloud.wait_reply(deep)["error"]["code"] == "invalid_args"
    cut = new_id()
    rig.cloud.send("drain", b'{"id": "' + cut.encode() + b'", "args": {')
    assert rig.cloud.wait_reply(cut)["error"]["code"] == "invalid_args"
    unknown = new_id()
    rig.cloud.send("status", {"id": unknown, "args": {}, "sneaky": 1})
    assert rig.cloud.wait_reply(unknown)["error"]["code"] == "invalid_args"
    rig.cloud.send("status", b"\xff\xfe not json, no id")
    rig.cloud.send("status", b'{"id": 42}')
    assert rig.agent.wait_log("has no readable id, so no reply")
    after = new_id()
    rig.cloud.send("status", {"id": after})
    assert rig.cloud.wait_reply(after)["ok"] is True
    assert rig.agent.alive()


def test_mqtt5_response_topic_gets_the_reply_with_its_correlation_data(rig):
    cid = new_id()
    rig.cloud.send("status", {"id": cid}, response_topic=f"resp/{cid}", correlation=b"\x00corr\xff")
    rig.cloud.wait_reply(cid)
    assert _wait(lambda: rig.cloud.on(f"resp/{cid}", cid))
    with rig.cloud.lock:
        (corr,) = [c for t, _p, c, _at in rig.cloud.replies if t == f"resp/{cid}"]
    assert corr == b"\x00corr\xff"
    assert rig.cloud.on(f"resp/{cid}", cid) == rig.cloud.on("/reply", cid)


def test_the_all_topic_reaches_the_agent(rig):
    cid = new_id()
    rig.cloud.send("status", {"id": cid}, everyone=True)
    assert rig.cloud.wait_reply(cid)["ok"] is True


def test_diagnostics_replies_with_doctor_and_the_log_ring_without_secrets(rig):
    cid = new_id()
    rig.cloud.send("diagnostics", {"id": cid, "args": {"log_lines": 50}})
    result = rig.cloud.wait_reply(cid, 30)["result"]
    assert result["doctor"] and all(set(c) == {"check", "ok", "detail"} for c in result["doctor"])
    assert any(c["check"] == "config" and c["ok"] for c in result["doctor"])
    assert 0 < len(result["log"]) <= 50
    assert any("connected to broker" in line for line in result["log"]) or len(result["log"]) == 50
    assert "t0ken-secret" not in json.dumps(result)


def test_drain_replies_with_sent_and_left(rig):
    cid = new_id()
    rig.cloud.send("drain", {"id": cid, "args": {}})
    reply = rig.cloud.wait_reply(cid, 40)
    assert reply["ok"] is True and set(reply["result"]) == {"sent", "left"}
    assert isinstance(reply["result"]["sent"], int) and reply["result"]["left"] >= 0


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_replies_are_not_stored_twice_in_the_table(rig, tmp_path):
    """Every recorded id has exactly one row, and replies the broker acknowledged are marked."""
    import sqlite3

    db = Path(rig.agent.config.read_text().split('data_dir = "')[1].split('"')[0]) / "buffer.db"
    cid = new_id()
    rig.cloud.send("status", {"id": cid})
    rig.cloud.wait_reply(cid)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert _wait(lambda: conn.execute("SELECT acked FROM commands WHERE id=?", (cid,)).fetchone() == (1,))
        stored = conn.execute("SELECT reply FROM commands WHERE id=?", (cid,)).fetchone()[0]
    finally:
        conn.close()
    assert bytes(stored) == rig.cloud.on("/reply", cid)[0]
    assert orjson.loads(stored)["id"] == cid


def test_diagnostics_fits_the_brokers_packet_limit(tmp_path):
    """A broker with a small Maximum Packet Size: the log's oldest lines give way, the reply arrives
    (a reply too big would make the broker drop the session, and the resend after it, forever)."""
    broker = Mosquitto(tmp_path / "mq", extra_conf="max_packet_size 20000\n").start()
    cfg = write_config(
        tmp_path / "agent.toml", tmp_path / "data", broker.port, toml_table("log", {"level": "debug"})
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    cloud = Commander(broker.port).start()
    try:
        assert cloud.wait_serving(), agent.tail()
        for _ in range(100):  # log lines enough to pass the limit
            cloud.send("status", {"id": new_id()})
        cid = new_id()
        cloud.send("diagnostics", {"id": cid, "args": {"log_lines": 5000}})
        rig_reply = cloud.wait_reply(cid, 30)
        assert rig_reply["ok"] is True, rig_reply
        assert 0 < len(rig_reply["result"]["log"]) < 5000
        assert len(cloud.on("/reply", cid)[0]) <= 20000
        after = new_id()
        cloud.send("status", {"id": after})
        assert cloud.wait_reply(after)["ok"] is True
    finally:
        cloud.stop()
        agent.stop()
        broker.stop()
