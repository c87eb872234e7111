"""The uplink against a real mosquitto: batches, PUBACK-then-delete, reconnects, state/will, TLS."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.buffer import Outbox
from agent.config import parse
from agent.core.envelope import Event
from agent.uplink import Uplink
from tests.support.buffer import open_outbox
from tests.support.certs import make_ca_and_server
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector
from tests.support.wait import wait_until


def config(data_dir: Path, port: int, extra: str = "", tls: str = "tls = false", backoff_max_s: float = 0.5):
    return parse(
        f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{data_dir}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n{tls}\nbackoff_max_s = {backoff_max_s}\nbatch_size = 50\n{extra}\n'.encode(),
        "test.toml",
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """The buffer `config(tmp_path, ...)` describes: its file, its identity, chunks of its batch_size (50)."""
    with open_outbox(tmp_path / "buffer.db", tenant="acme", store="s1", agent="a1", chunk_events=50) as box:
        yield box


def test_backlog_arrives_in_seq_order_per_stream_and_leaves_the_buffer(tmp_path, broker, outbox):
    cfg = config(tmp_path, broker.port)
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
        collector.stop()


def test_each_new_event_wakes_the_uplink(tmp_path, broker, monkeypatch, outbox):
    """Online events go out when committed, not at the next timer tick (a lost wake-up once made
    every event wait for the idle timeout): with that timeout an hour, they must still arrive."""
    monkeypatch.setattr(Uplink, "IDLE_WAIT_S", 3600.0)
    cfg = config(tmp_path, broker.port, extra="metrics_interval_s = 3600")
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
        assert collector.wait_for(lambda c: ids[0] in c.ids(), 20), (
            "an event committed while idle was not sent"
        )
    finally:
        uplink.stop(1)
        collector.stop()


def test_offline_then_broker_appears_resumes_by_itself(tmp_path, outbox):
    port = free_port()
    cfg = config(tmp_path, port)
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
        if broker:
            broker.stop()


def test_will_says_offline_when_the_agent_dies(tmp_path, broker, outbox):
    cfg = config(tmp_path, broker.port, extra="keepalive_s = 5")
    uplink = Uplink(cfg, outbox).start()
    collector = Collector(broker.port, "retail/acme/s1/a1/state").start()
    try:
        assert collector.wait_for(lambda c: any(orjson.loads(p)["online"] for _, p, _ in c.messages), 10)
        uplink.stop(1)  # a clean stop says offline itself (the will is only for deaths)
        assert collector.wait_for(lambda c: not orjson.loads(c.messages[-1][1])["online"], 10)
    finally:
        collector.stop()


def tls_broker(tmp_path: Path) -> tuple[Mosquitto, dict[str, Path]]:
    certs = make_ca_and_server(tmp_path / "pki")
    port = free_port()
    b = Mosquitto(
        tmp_path / "mq-tls",
        port=port,
        extra_conf=f"cafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n",
    )
    return b.start(), certs


def test_tls_with_the_right_ca_delivers(tmp_path, outbox):
    broker, certs = tls_broker(tmp_path)
    cfg = config(tmp_path, broker.port, tls=f'tls = true\nca_file = "{certs["ca"]}"')
    uplink = Uplink(cfg, outbox).start()
    try:
        outbox.commit_sync([Event("pos.sale", {"i": 1}, "pos:1")])
        assert wait_until(lambda: outbox.count == 0, 15), uplink.status
        assert uplink.status.connected
    finally:
        uplink.stop(1)
        broker.stop()


@pytest.mark.parametrize("case", ["wrong_ca", "plaintext_broker"])
def test_failed_tls_is_an_error_never_a_plaintext_fallback(tmp_path, case, outbox):
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
    uplink = Uplink(cfg, outbox).start()
    try:
        outbox.commit_sync([Event("pos.sale", {"secret": "card"}, "pos:1")])
        assert wait_until(
            lambda: (
                uplink.status.last_error is not None
                and uplink.status.reconnects == 0
                and (uplink.status.next_attempt_s is not None)
            ),
            10,
        )
        assert wait_until(lambda: "TLS handshake failed" in (uplink.status.last_error or ""), 10), (
            uplink.status.last_error
        )
        time.sleep(0.5)  # a window in which a fallback would have sent it: nothing may arrive
        assert outbox.count == 1 and not uplink.status.connected
        if collector is not None:
            assert collector.events == []
    finally:
        uplink.stop(1)
        broker.stop()
        if collector is not None:
            collector.stop()


# ---- issue 12/17: what the broker refuses, what cannot fit, reconnect pacing, a dead thread --------------


def set_aside_events(collector: Collector) -> list[dict]:
    return [e for e in collector.events if e["type"] == "system.batch_set_aside"]


def test_refused_puback_is_never_success_and_the_rows_arrive_once_allowed(tmp_path, outbox):
    """MQTT 5: a broker whose ACL refuses `up/pos` answers PUBACK 0x87. The POS rows stay in the
    buffer (set aside, reported), the rest goes past them; once allowed, they arrive exactly once."""
    acl = tmp_path / "acl"
    deny_pos = (
        "topic read retail/#\n"
        "topic write retail/acme/s1/a1/state\ntopic write retail/acme/s1/a1/metrics\n"
        "topic write retail/acme/s1/a1/up/app\ntopic write retail/acme/s1/a1/up/system\n"
    )
    acl.write_text(deny_pos)
    broker = Mosquitto(tmp_path / "mq", extra_conf=f"acl_file {acl}\n").start()
    cfg = config(tmp_path, broker.port)
    pos_ids = outbox.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(5)]).ids
    app_ids = outbox.commit_sync([Event("app.checkin", {"i": i}, "api") for i in range(3)]).ids
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    uplink = Uplink(cfg, outbox).start()
    try:
        # the refusal is no success, and the POS batch is not in front of the rest
        assert collector.wait_for(lambda c: set(app_ids) <= c.ids() and set_aside_events(c), 20), (
            uplink.status
        )
        report = set_aside_events(collector)[0]["data"]
        assert report["stream"] == "pos" and report["events"] == 5
        # mosquitto 2.0 closes the session after a refusal: when that close loses the PUBACK, the
        # batch is set aside for taking the connection down three times instead
        assert "Not authorized" in report["reason"] or "connection dropped" in report["reason"], report
        assert not set(pos_ids) & collector.ids()
        assert wait_until(lambda: outbox.count == 5, 10), outbox.count  # the POS rows stay
        # (mosquitto 2.0 also drops the session after a refusal: the uplink connects again and goes on)
        assert wait_until(lambda: uplink.status.connected, 10)
        assert uplink.status.set_aside_total == 1
        assert (uplink.status.set_aside_chunks, uplink.status.set_aside_events) == (1, 5)
        # allow it: the broker reloads its ACL on SIGHUP; `drain` retries what was set aside
        acl.write_text(deny_pos + "topic write retail/#\n")
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: (uplink.attempt_now(), outbox.count == 0)[1], 20, interval=0.5), (
            uplink.status
        )
        pos_seen = [e["id"] for e in collector.events if e["type"] == "pos.sale"]
        assert sorted(pos_seen) == sorted(pos_ids), "each POS event exactly once"
        assert uplink.status.set_aside_events == 0
    finally:
        uplink.stop(1)
        collector.stop()
        broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_event_bigger_than_the_broker_packet_limit_does_not_stop_the_rest(tmp_path, protocol, outbox):
    """mosquitto `max_packet_size 1048576` and one 2 MB event committed first: the POS events after it
    are delivered, the big one stays in the buffer, set aside and reported. MQTT 5 knows the limit
    from the CONNACK; under 3.1.1 the broker just drops the connection, and the batch that keeps
    going down with it is set aside."""
    broker = Mosquitto(tmp_path / "mq", extra_conf="max_packet_size 1048576\n").start()
    cfg = config(tmp_path, broker.port, extra=f'protocol = "{protocol}"')
    outbox.commit_sync([Event("app.blob", {"b": "x" * 2_000_000}, "api")])
    pos_ids = [outbox.commit_sync([Event("pos.sale", {"i": i}, "pos:1")]).ids[0] for i in range(5)]
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    uplink = Uplink(cfg, outbox).start()
    try:
        assert collector.wait_for(lambda c: set(pos_ids) <= c.ids(), 30), uplink.status
        assert collector.wait_for(lambda c: set_aside_events(c), 10)
        assert set_aside_events(collector)[0]["data"]["stream"] == "app"
        assert wait_until(lambda: outbox.count == 1, 10)  # the big event is kept, not deleted
        assert uplink.status.set_aside_total == 1 and uplink.status.set_aside_events == 1
        if protocol == "5":
            assert uplink.status.max_packet_bytes == 1048576
            assert 1_000_000 < uplink.max_event_bytes < 1048576
            assert "Maximum Packet Size" in (uplink.status.last_set_aside or "")
        else:
            assert uplink.max_event_bytes == cfg.mqtt.batch_max_bytes
        # later events keep flowing, and the set-aside row is still not in front of them
        later = outbox.commit_sync([Event("pos.sale", {"later": 1}, "pos:1")]).ids
        assert collector.wait_for(lambda c: later[0] in c.ids(), 20)
        # and it survives a restart of the uplink as set aside, not as the head of the backlog
        uplink.stop(1)
        uplink = Uplink(cfg, outbox).start()
        assert wait_until(lambda: uplink.status.connected, 10)
        assert wait_until(lambda: uplink.status.set_aside_events == 1, 10)
        again = outbox.commit_sync([Event("pos.sale", {"again": 1}, "pos:1")]).ids
        assert collector.wait_for(lambda c: again[0] in c.ids(), 20)
    finally:
        uplink.stop(1)
        collector.stop()
        broker.stop()


class CutAfterConnack:
    """A TCP proxy in front of a real broker that passes CONNECT and CONNACK, then closes: a broker
    that accepts the connection and refuses the session. Counts the connections it accepted."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as broker:
            client.settimeout(5)
            broker.settimeout(5)
            try:
                broker.sendall(client.recv(65536))  # CONNECT
                client.sendall(broker.recv(65536))  # CONNACK
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_backoff_is_not_reset_by_a_connack_alone(tmp_path, broker, outbox):
    """A session that drops right after its CONNACK has not proved healthy: the reconnects slow
    down along the ladder (they used to restart from the bottom: about 4 connections a second)."""
    proxy = CutAfterConnack(broker.port)
    cfg = config(tmp_path, proxy.port, backoff_max_s=30)
    outbox.commit_sync([Event("pos.sale", {"i": 1}, "pos:1")])
    uplink = Uplink(cfg, outbox).start()
    try:
        assert wait_until(lambda: proxy.connections >= 1, 10)
        start = proxy.connections
        window = 8.0
        time.sleep(window)  # the bounded window over which connections are counted
        made = proxy.connections - start
        # equal jitter from 0.5 s doubling: at most 5 more attempts fit 8 s (0.25+0.5+1+2+4 s)
        assert made <= 5, f"{made} connections in {window} s"
        assert uplink.alive and outbox.count == 1
    finally:
        uplink.stop(1)
        proxy.close()


def test_a_failure_while_connecting_is_reported_and_retried_never_ending_the_thread(tmp_path, broker, outbox):
    """A password file gone after start (make_client raises): the uplink thread lives on, says why in
    `last_error`, and connects once the file is back."""
    secret = tmp_path / "mqtt.password"
    secret.write_text("pw\n")
    cfg = config(tmp_path, broker.port, extra=f'username = "agent"\npassword_file = "{secret}"')
    secret.unlink()
    uplink = Uplink(cfg, outbox).start()
    try:
        assert wait_until(lambda: "cannot connect" in (uplink.status.last_error or ""), 10), uplink.status
        assert "mqtt.password" in (uplink.status.last_error or "")
        assert wait_until(lambda: uplink.status.next_attempt_s is not None, 5)
        assert uplink.alive
        secret.write_text("pw\n")
        assert wait_until(lambda: uplink.status.connected, 20), uplink.status
        assert uplink.alive
    finally:
        uplink.stop(1)


def test_mqtt_311_delivers_end_to_end(tmp_path, broker, outbox):
    cfg = config(tmp_path, broker.port, extra='protocol = "3.1.1"')
    ids = outbox.commit_sync([Event("pos.sale", {"i": i}, "pos:1") for i in range(120)]).ids
    collector = Collector(broker.port, "retail/acme/s1/a1/#").start()
    uplink = Uplink(cfg, outbox).start()
    try:
        assert collector.wait_for(lambda c: set(ids) <= c.ids(), 20), uplink.status
        assert wait_until(lambda: outbox.count == 0, 10)
        assert uplink.status.max_packet_bytes is None
        assert collector.wait_for(lambda c: any(t.endswith("/state") for t, _, _ in c.messages), 10)
    finally:
        uplink.stop(1)
        collector.stop()


def test_reconnect_schedule_probes_quickly_while_nothing_answers_and_backs_off_when_the_broker_does():
    import random

    from agent.core.backoff import ReconnectSchedule

    schedule = ReconnectSchedule(cap=30.0, rng=random.Random(7))
    quiet = [schedule.next_delay(answered=False) for _ in range(200)]
    assert 0.25 <= quiet[0] <= 1.0 and all(1.0 <= d <= 4.0 for d in quiet[2:])
    schedule.reset()
    answered = [schedule.next_delay(answered=True) for _ in range(12)]
    assert answered[0] <= 0.5 and all(15.0 <= d <= 30.0 for d in answered[6:])
    assert all(b >= a / 2 for a, b in zip(answered, answered[1:], strict=False))
    short = ReconnectSchedule(cap=0.5, rng=random.Random(1))
    assert all(d <= 0.5 for d in [short.next_delay(answered=k % 2 == 0) for k in range(50)])
