"""The uplink against a real mosquitto: batches, PUBACK-then-delete, reconnects, state/will, TLS."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from agent.buffer import Outbox
from agent.config import parse
from agent.core.envelope import Event
from agent.uplink import Uplink
from tests.support.agentproc import wait_until
from tests.support.certs import make_ca_and_server
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector


def config(data_dir: Path, port: int, extra: str = "", tls: str = "tls = false"):
    return parse(
        f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{data_dir}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n{tls}\nbackoff_max_s = 0.5\nbatch_size = 50\n{extra}\n'.encode(),
        "test.toml",
    )


def make_outbox(cfg) -> Outbox:
    return Outbox.from_config(cfg).start()


def test_backlog_arrives_in_seq_order_per_stream_and_leaves_the_buffer(tmp_path, broker):
    cfg = config(tmp_path, broker.port)
    outbox = make_outbox(cfg)
    for i in range(40):
        outbox.commit_sync([Event("pos.sale", {"i": i}, "pos:1")])
        outbox.commit_sync([Event("app.checkin", {"i": j}, "api") for j in range(20)])
        outbox.commit_sync([Event("traffic.summary", {"i": i}, "ble")])
    collector = Collector(broker.port, "retail/#").start()
    uplink = Uplink(cfg, outbox).start()
    try:
        assert collector.wait_for(lambda c: len(c.events) >= 40 * 22, 30)
        assert wait_until(lambda: outbox.count == 0, 10)
        per_stream = defaultdict(list)
        for topic, payload, _ in collector.messages:
            if "/up/" in topic:
                batch = orjson.loads(payload)
                assert batch["agent"] == "a1"
                assert len(batch["events"]) <= 50
                stream = topic.rsplit("/", 1)[1]
                assert topic.startswith("retail/acme/s1/a1/up/")
                assert {e["type"].split(".")[0] for e in batch["events"]} == {stream}
                per_stream[stream] += [e["seq"] for e in batch["events"]]
        for stream, seqs in per_stream.items():
            assert seqs == sorted(seqs), f"{stream} out of order"
        assert len(collector.ids()) == 40 * 22
        assert len(collector.events) == 40 * 22, "each event once: no duplicates without faults"
        # online retained state was published
        states = [orjson.loads(p) for t, p, _ in collector.messages if t.endswith("/state")]
        assert states and states[0]["online"] is True
    finally:
        uplink.stop(2)
        outbox.close()
        collector.stop()


def test_each_new_event_wakes_the_uplink(tmp_path, broker, monkeypatch):
    """Online events go out when committed, not at the next timer tick (a lost wake-up once made
    every event wait for the idle timeout): with that timeout an hour, they must still arrive."""
    monkeypatch.setattr(Uplink, "IDLE_WAIT_S", 3600.0)
    cfg = config(tmp_path, broker.port, extra="metrics_interval_s = 3600")
    outbox = make_outbox(cfg)
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    uplink = Uplink(cfg, outbox).start()
    try:
        assert wait_until(lambda: uplink.status.connected, 10)
        # several committers at once, one event a commit, as drivers and API clients do
        def commit_many(k: int) -> None:
            for i in range(150):
                outbox.commit_sync([Event("pos.sale", {"k": k, "i": i}, "pos:1")])

        threads = [threading.Thread(target=commit_many, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert collector.wait_for(lambda c: len(c.ids()) == 900, 20), f"{len(collector.ids())} of 900 sent"
        # and once idle, a single event still goes out
        ids = outbox.commit_sync([Event("pos.sale", {"last": 1}, "pos:1")]).ids
        assert collector.wait_for(lambda c: ids[0] in c.ids(), 20), "an event committed while idle was not sent"
    finally:
        uplink.stop(1)
        outbox.close()
        collector.stop()


def test_offline_then_broker_appears_resumes_by_itself(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port)
    outbox = make_outbox(cfg)
    uplink = Uplink(cfg, outbox).start()
    broker = None
    try:
        outbox.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(10)])
        assert wait_until(lambda: uplink.status.last_error is not None, 10)
        assert outbox.count == 10
        broker = Mosquitto(tmp_path / "mq", port=port).start()
        collector = Collector(port, "retail/#").start()
        # the agent may have connected before the collector: its will/state are not what we count;
        # the backlog is, and it is only deleted after PUBACK, so commit more after subscribing too
        outbox.commit_sync([Event("pos.sale", {"i": 10 + i}, "pos:1") for i in range(5)])
        assert wait_until(lambda: outbox.count == 0, 20), uplink.status
        assert collector.wait_for(lambda c: {e["data"]["i"] for e in c.events} >= set(range(10, 15)), 10)
        collector.stop()
    finally:
        uplink.stop(1)
        outbox.close()
        if broker:
            broker.stop()


def test_will_says_offline_when_the_agent_dies(tmp_path, broker):
    cfg = config(tmp_path, broker.port, extra="keepalive_s = 5")
    outbox = make_outbox(cfg)
    uplink = Uplink(cfg, outbox).start()
    collector = Collector(broker.port, "retail/acme/s1/a1/state").start()
    try:
        assert collector.wait_for(lambda c: any(orjson.loads(p)["online"] for _, p, _ in c.messages), 10)
        uplink.stop(1)  # a clean stop says offline itself (the will is only for deaths)
        assert collector.wait_for(lambda c: not orjson.loads(c.messages[-1][1])["online"], 10)
    finally:
        outbox.close()
        collector.stop()


def tls_broker(tmp_path: Path) -> tuple[Mosquitto, dict[str, Path]]:
    certs = make_ca_and_server(tmp_path / "pki")
    port = free_port()
    b = Mosquitto(tmp_path / "mq-tls", port=port,
                  extra_conf=f"cafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n")
    return b.start(), certs


def test_tls_with_the_right_ca_delivers(tmp_path):
    broker, certs = tls_broker(tmp_path)
    cfg = config(tmp_path, broker.port, tls=f'tls = true\nca_file = "{certs["ca"]}"')
    outbox = make_outbox(cfg)
    uplink = Uplink(cfg, outbox).start()
    try:
        outbox.commit_sync([Event("pos.sale", {"i": 1}, "pos:1")])
        assert wait_until(lambda: outbox.count == 0, 15), uplink.status
        assert uplink.status.connected
    finally:
        uplink.stop(1)
        outbox.close()
        broker.stop()


@pytest.mark.parametrize("case", ["wrong_ca", "plaintext_broker"])
def test_failed_tls_is_an_error_never_a_plaintext_fallback(tmp_path, case):
    if case == "wrong_ca":
        broker, _ = tls_broker(tmp_path)
        other = make_ca_and_server(tmp_path / "other")
        tls = f'tls = true\nca_file = "{other["ca"]}"'
    else:
        broker = Mosquitto(tmp_path / "plain").start()
        other = make_ca_and_server(tmp_path / "other")
        tls = f'tls = true\nca_file = "{other["ca"]}"'
    collector = Collector(broker.port, "#").start() if case == "plaintext_broker" else None
    cfg = config(tmp_path, broker.port, tls=tls)
    outbox = make_outbox(cfg)
    uplink = Uplink(cfg, outbox).start()
    try:
        outbox.commit_sync([Event("pos.sale", {"secret": "card"}, "pos:1")])
        assert wait_until(lambda: uplink.status.last_error is not None and uplink.status.reconnects == 0
                          and (uplink.status.next_attempt_s is not None), 10)
        assert wait_until(lambda: "TLS handshake failed" in (uplink.status.last_error or ""), 10), \
            uplink.status.last_error
        time.sleep(0.5)  # a window in which a fallback would have sent it: nothing may arrive
        assert outbox.count == 1 and not uplink.status.connected
        if collector is not None:
            assert collector.events == []
    finally:
        uplink.stop(1)
        outbox.close()
        broker.stop()
        if collector is not None:
            collector.stop()
