"""kill -9 tests: the real `store-agent run` process, a real mosquitto, a POS played over a real pty.

How the subscriber stays deterministic across broker kills:
- The collector has a persistent session (clean_session=False) on a mosquitto with persistence,
  and the broker's database is saved (SIGUSR1) once the collector has subscribed. A broker killed
  with -9 and started again still holds the collector's subscription, so what the agent publishes
  after the restart is queued for the collector even when the agent reconnects first: no race
  between the agent's backoff and the collector's resubscription.
- mosquitto writes a message to its subscribers before it sends the PUBACK, but a subscriber
  slower than the agent (this Python collector) leaves acknowledged messages in the broker's
  memory, which a kill -9 loses through no fault of the agent's. So the broker is killed at a
  consistent cut: see `kill_broker`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import select
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import Outbox
from agent.buffer.codec import pack
from agent.buffer.footprint import wal_bound
from agent.core.envelope import Event
from agent.protocols.stxetx import ACK, NAK, encode_frame
from tests.support.agentproc import AgentProcess, status_json, toml_keys, toml_table
from tests.support.agentproc import write_config as write_agent_config
from tests.support.buffer import prefill, stored_count
from tests.support.mosquitto import Mosquitto
from tests.support.ptys import Pty
from tests.support.subscriber import Collector
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

TENANT, STORE, AGENT_ID = "acme", "sh-0012", "till-1"
RESEND_AFTER_S = 2.0  # what a POS does without an answer (contract 4.1)


# ---- the parts ----------------------------------------------------------------------------------


class SessionCollector(Collector):
    """tests/subscriber.py's Collector with a persistent session and a quick reconnect."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(port, topic, client_id="crash-collector")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="crash-collector",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)

    def pos_ids(self) -> dict[str, set[str]]:
        """txn_id -> the event ids it arrived under."""
        out: dict[str, set[str]] = defaultdict(set)
        with self.lock:
            for e in self.events:
                if e["type"].startswith("pos.") and e["type"] != "pos.invalid":
                    out[e["data"]["txn_id"]].add(e["id"])
        return out


class Broker(Mosquitto):
    """A mosquitto with persistence, so a kill -9 keeps the sessions saved before it."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir,
            extra_conf=(
                f"persistence true\npersistence_location {workdir}/\npersistence_file broker.db\n"
                "autosave_interval 3600\n"
            ),
        )
        self.db = self.workdir / "broker.db"

    def save(self) -> None:
        """Write the broker's database now (SIGUSR1) and wait until it is on disk."""
        assert self.proc is not None
        before = self.db.stat().st_mtime_ns if self.db.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR1)
        assert wait_until(lambda: self.db.exists() and self.db.stat().st_mtime_ns != before, 10), (
            "broker database save"
        )


class Till(threading.Thread):
    """A POS on the pty master: one frame at a time, resend on NAK or after 2 s, next after ACK."""

    def __init__(
        self, master: int, make: Callable[[int], dict[str, Any]] | None = None, pace: float = 0.005
    ) -> None:
        super().__init__(name="till", daemon=True)
        self.master = master
        self.make = make or sale
        self.pace = pace
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.sent: set[str] = set()
        self.naks = 0
        self.silences = 0
        self.error: str | None = None
        self._stop_event = threading.Event()
        self._deadline = time.monotonic() + 170

    def stop(self, timeout: float = 30) -> None:
        """Finish the transaction in hand (until it is ACKed), then stop."""
        self._stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the till could not finish its last transaction"
        assert self.error is None, self.error

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def run(self) -> None:
        n = 0
        try:
            while not self._stop_event.is_set():
                n += 1
                payload = self.make(n)
                self.sent.add(payload["txn_id"])
                self.send(encode_frame(orjson.dumps(payload)))
                with self.lock:
                    self.acked.append(payload["txn_id"])
                self._stop_event.wait(self.pace)  # the till's pace between customers
        except Exception as exc:  # reported by stop()
            self.error = f"{type(exc).__name__}: {exc}"

    def send(self, frame: bytes) -> None:
        while time.monotonic() < self._deadline:
            answer = exchange(self.master, frame, RESEND_AFTER_S)
            if answer == ACK:
                return
            if answer == NAK:
                self.naks += 1
            else:
                self.silences += 1
        raise TimeoutError("no ACK before the till's deadline")


def exchange(master: int, frame: bytes, wait: float) -> int | None:
    """Send one frame and return the answer (ACK/NAK), or None after `wait` seconds of silence."""
    with contextlib.suppress(BlockingIOError, OSError):  # a late answer to an earlier copy
        while os.read(master, 4096):
            pass
    deadline = time.monotonic() + wait
    view = memoryview(frame)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if select.select([], [master], [], left)[1]:
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(master, view) :]
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([master], [], [], left)[0]:
            return None
        with contextlib.suppress(BlockingIOError):
            for byte in os.read(master, 4096):
                if byte in (ACK, NAK):
                    return byte


def sale(n: int, pad: int = 0) -> dict[str, Any]:
    items = [{"gtin": "06901234567892", "qty": 1, "unit_price": "12.50", "name": "x" * 40}] * max(1, pad)
    return {
        "txn_id": f"R1-{n:06d}",
        "register": "R1",
        "ts": "2026-11-23T16:15:02+08:00",
        "kind": "sale",
        "items": items,
        "total": f"{12.5 * len(items):.2f}",
        "currency": "CNY",
        "member_id": "M000123",
    }


def noisy(txn: dict[str, Any]) -> dict[str, Any]:
    """The sale with random item names, so that it takes about as much room compressed as it says."""
    return dict(
        txn, items=[dict(item, name=base64.b64encode(os.urandom(96)).decode()) for item in txn["items"]]
    )


def write_config(tmp_path: Path, broker_port: int, pty_path: str | None, **sections: dict[str, Any]) -> Path:
    """The agent's config: [mqtt] keys and other sections as dicts, one stxetx POS on `pty_path`."""
    extra = '[log]\nlevel = "info"\n' + "".join(
        toml_table(name, keys) for name, keys in sections.items() if name != "mqtt"
    )
    if pty_path is not None:
        extra += toml_table("[[pos]]", {"name": "front-1", "port": pty_path})
    return write_agent_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        broker_port,
        extra,
        mqtt_extra=toml_keys(sections.get("mqtt", {})),
        tenant=TENANT,
        store=STORE,
        agent=AGENT_ID,
    )


def buffer_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "buffer.db"


def buffer_events(config: Path, tmp_path: Path) -> int:
    """Events not yet acknowledged upstream: `status --json`, else the buffer file itself."""
    try:
        return int(status_json(config)["buffer"]["events"])
    except subprocess.CalledProcessError:
        return stored_count(buffer_path(tmp_path))


def prefill_agent(tmp_path: Path, events: list[Event], batch: int = 5000, **outbox_kw: Any) -> None:
    """Commit events into the agent's own buffer file before the agent starts (the agent's path)."""
    prefill(tmp_path / "data", events, batch=batch, tenant=TENANT, store=STORE, agent=AGENT_ID, **outbox_kw)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[Broker, SessionCollector]]:
    broker = Broker(tmp_path / "broker").start()
    collector = SessionCollector(broker.port, "retail/#").start()
    broker.save()  # the collector's session and subscription survive a kill -9 from here on
    try:
        yield broker, collector
    finally:
        with contextlib.suppress(Exception):
            collector.stop()
        broker.kill()


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    finalizers: list[Callable[[], None]] = []
    yield finalizers
    for fin in reversed(finalizers):
        with contextlib.suppress(Exception):
            fin()


def assert_once_each(collector: SessionCollector, acked: list[str], sent: set[str]) -> None:
    arrived = collector.pos_ids()
    missing = [t for t in acked if t not in arrived]
    assert not missing, f"{len(missing)} ACKed transactions never arrived upstream, e.g. {missing[:5]}"
    twice = {t: ids for t, ids in arrived.items() if len(ids) > 1}
    assert not twice, f"transactions stored under two ids: {list(twice.items())[:3]}"
    assert set(arrived) <= sent
    seq_of: dict[str, int] = {}
    with collector.lock:
        for e in collector.events:
            assert seq_of.setdefault(e["id"], e["seq"]) == e["seq"], "an id arrived with two seqs"
    assert len(set(seq_of.values())) == len(seq_of), "two ids share a seq"


def fence(broker: Broker, collector: SessionCollector, n: int) -> int:
    """Publish a marker through the broker and wait until the collector has it; returns how many
    events the collector held then (everything the broker forwarded before the marker is in)."""
    topic = f"retail/fence/{n}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fence-{n}", protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port, 30)
    client.loop_start()
    try:
        client.publish(topic, b"fence", qos=1).wait_for_publish(10)
        assert wait_until(lambda: any(m[0] == topic for m in collector.messages[-50:]), 10), (
            "the fence marker"
        )
    finally:
        client.disconnect()
        client.loop_stop()
    return len(collector.events)


def kill_broker(broker: Broker, collector: SessionCollector, agent: AgentProcess) -> None:
    """kill -9 the broker in the middle of the agent's traffic, at a cut the collector can see.

    A broker acknowledges (PUBACK) a message as soon as it has queued it for the subscribers, and
    the collector (Python) reads slower than the agent publishes: at full drain speed mosquitto
    holds thousands of acknowledged messages in its own memory, which a kill -9 loses. That is
    the broker's durability, not the agent's, so the agent is frozen (SIGSTOP) for the kill:
    fences through the broker wait until everything the broker acknowledged has reached the
    collector, the broker dies, and the agent wakes up (SIGCONT) to a dead connection with its
    own batches in flight and unacknowledged PUBACKs, as after any broker crash.
    """
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        last = -1
        for n in range(50):  # until no agent event came in between two fences
            count = fence(broker, collector, n)
            if count == last:
                break
            last = count
        broker.kill()
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


# ---- 1. kill -9 of the agent, with the broker up, down, and up again ----------------------------


def test_agent_kill9_loses_no_acked_transaction(tmp_path: Path, upstream, cleanup) -> None:
    broker, collector = upstream
    pty = Pty()
    cleanup.append(pty.close)
    agent = AgentProcess(write_config(tmp_path, broker.port, pty.path), tmp_path / "agent.log")
    cleanup.append(agent.stop)
    till = Till(pty.master)
    till.start()
    cleanup.append(lambda: till.stop(5))
    rng = random.Random(20261123)
    kills = 24
    agent.start()
    for i in range(kills):
        if i == kills // 3:
            # broker down: the agent keeps taking transactions into its buffer
            kill_broker(broker, collector, agent)
        elif i == 2 * kills // 3:
            broker.start()  # same port, same database: the collector's session is still there
        if rng.random() < 0.25:
            # a random moment early in the agent's life (starting, opening the port, reconnecting);
            # this sleep picks the moment of the fault, it does not wait for anything
            time.sleep(rng.uniform(0.05, 0.8))
        else:
            target = till.count() + rng.randint(1, 25)
            assert wait_until(lambda t=target: till.count() >= t or not agent.alive(), 30), (
                f"the till's ACK #{target} (kill {i}): {agent.tail()}"
            )
            time.sleep(rng.uniform(0, 0.02))  # somewhere in the next frame's round trip
        agent.kill9()
        agent.start()
    target = till.count() + 20
    assert wait_until(lambda: till.count() >= target, 30), "ACKs after the last restart"
    till.stop()
    assert agent.starts == kills + 1
    acked = list(till.acked)
    assert len(acked) > kills
    assert wait_until(lambda: set(acked) <= set(collector.pos_ids()), 60), "every ACKed transaction upstream"
    assert_once_each(collector, acked, till.sent)
    # the till moves on only after an ACK, so each transaction was committed after the one
    # before it: seqs rise in till order across all the restarts
    with collector.lock:
        seq_of = {e["data"]["txn_id"]: e["seq"] for e in collector.events if e["type"] == "pos.sale"}
    seqs = [seq_of[t] for t in acked]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert wait_until(lambda: buffer_events(agent.config, tmp_path) == 0, 30), "an empty buffer"


# ---- 2. kill -9 of the broker while a backlog drains ---------------------------------------------


def test_broker_kill9_during_drain_loses_nothing(tmp_path: Path, upstream, cleanup) -> None:
    broker, collector = upstream
    # big enough that the freeze comes mid-drain even when the collector lags far behind the agent
    total = 100_000
    events = [Event("app.checkin", {"n": i, "door": "front"}, "local_api") for i in range(total)]
    config = write_config(tmp_path, broker.port, None, mqtt={"batch_size": 100})
    prefill_agent(tmp_path, events, chunk_events=100)
    agent = AgentProcess(config, tmp_path / "agent.log")
    cleanup.append(agent.stop)
    agent.start()
    assert wait_until(lambda: len(collector.events) >= 2_000, 30), f"the drain to start: {agent.tail()}"
    kill_broker(broker, collector, agent)
    assert len(collector.events) < total, (
        "the backlog drained before the broker was killed: nothing was tested"
    )
    broker.start()
    # (the cheap count first: ids() copies under the collector's lock)
    assert wait_until(lambda: len(collector.events) >= total and len(collector.ids()) >= total, 60), (
        "the rest of the backlog after the broker restart"
    )
    assert agent.alive() and agent.starts == 1  # it resumed by itself
    with collector.lock:
        assert sorted({e["data"]["n"] for e in collector.events}) == list(range(total))
    assert wait_until(lambda: buffer_events(config, tmp_path) == 0, 30), "an empty buffer"


# ---- 3. 100,000 events buffered offline, then the broker comes up --------------------------------


def test_offline_backlog_of_100k_arrives_in_order(tmp_path: Path, upstream, cleanup) -> None:
    broker, collector = upstream
    total = 100_000
    # two streams interleaved in runs, as a store's traffic is
    events = [
        Event("app.checkin" if (i // 250) % 2 else "kpi.sample", {"n": i}, "local_api") for i in range(total)
    ]
    config = write_config(tmp_path, broker.port, None)
    prefill_agent(tmp_path, events)
    broker.kill()
    agent = AgentProcess(config, tmp_path / "agent.log")
    cleanup.append(agent.stop)
    agent.start()  # offline: the broker is down, the agent retries with backoff
    broker.start()
    assert wait_until(lambda: len(collector.events) >= total, 60), f"100,000 events upstream: {agent.tail()}"
    with collector.lock:
        received = [e for e in collector.events if e["type"] in ("app.checkin", "kpi.sample")]
    assert len(received) == total and len({e["id"] for e in received}) == total
    assert sorted(e["data"]["n"] for e in received) == list(range(total))
    last: dict[str, int] = {}
    for e in received:
        stream = e["type"].partition(".")[0]
        assert e["seq"] > last.get(stream, 0), f"{stream} out of seq order at {e['seq']}"
        last[stream] = e["seq"]
    assert wait_until(lambda: buffer_events(config, tmp_path) == 0, 30), "buffer.events == 0"


# ---- 4. the disk cap: low priority dropped and counted, POS refused (no ACK) until drained ------

TRAFFIC = 120


def test_disk_cap_drops_traffic_and_holds_pos_acks(tmp_path: Path, upstream, cleanup) -> None:
    broker, collector = upstream
    broker.kill()  # offline from the start: the buffer fills
    pty = Pty()
    cleanup.append(pty.close)
    # random text in each event: the cap counts stored (compressed) bytes, and these must not shrink
    traffic = [
        Event(
            "traffic.summary",
            {
                "zone": "door",
                "present": i,
                "entered": 1,
                "left": 0,
                "noise": base64.b64encode(os.urandom(230)).decode(),
            },
            "ble",
        )
        for i in range(TRAFFIC)
    ]
    outbox = Outbox(buffer_path(tmp_path), tenant=TENANT, store=STORE, agent=AGENT_ID).start()
    for i in range(0, TRAFFIC, 10):  # a dozen rows, so the cap can drop the oldest few
        outbox.commit_sync(traffic[i : i + 10])
    traffic_bytes = outbox.bytes
    # the whole data_dir counts toward the cap: leave the events 64 KiB beside the schema, the
    # side files, the pages' slack (measured) and the WAL's reserve
    cap = 64 * 1024 + outbox.footprint.overhead
    cap += 2 * wal_bound(cap)
    outbox.close()
    config = write_config(tmp_path, broker.port, pty.path, buffer={"max_bytes": cap})
    big = [orjson.dumps(noisy(sale(n, pad=280))) for n in (1, 2, 3)]
    # the sizes this scenario needs (as stored): one big sale fits, the second drops some traffic,
    # the third cannot be made room for (what traffic is left is smaller than it). A dropped traffic
    # row frees its whole page, slack included, so the calibrated cap grows by more than the row's
    # stored bytes: the sales must be big enough that all three do not fit even with no traffic left
    assert 28_000 < traffic_bytes < 33_000 and 26_500 < len(pack(big[0])) < 29_000
    agent = AgentProcess(config, tmp_path / "agent.log")
    cleanup.append(agent.stop)
    agent.start()
    frames = [encode_frame(b) for b in big]

    def send_until_acked(data: bytes) -> None:
        """As a POS does: resend on NAK or silence (the agent may still be opening the port)."""
        deadline = time.monotonic() + 60
        while exchange(pty.master, data, RESEND_AFTER_S) != ACK:
            assert time.monotonic() < deadline, f"no ACK: {agent.tail()}"

    send_until_acked(frames[0])
    send_until_acked(frames[1])  # made room by dropping the oldest traffic
    # the third cannot be taken: no answer at all. Answers come in frame order, so sending it,
    # then a resend of the first (a duplicate needs no room: ACK) and junk (NAK), and getting
    # exactly ACK then NAK back proves the third got nothing.
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(pty.master, 4096):
            pass
    got = b""
    wire = frames[2] + frames[0] + b"junk"
    view = memoryview(wire)
    deadline = time.monotonic() + 20
    while NAK not in got and time.monotonic() < deadline:
        if view and select.select([], [pty.master], [], 0.05)[1]:
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(pty.master, view) :]
        if select.select([pty.master], [], [], 0.05)[0]:
            with contextlib.suppress(BlockingIOError):
                got += os.read(pty.master, 4096)
    assert got == bytes([ACK, NAK]), (got, agent.tail())
    # the broker comes back and drains the buffer; the POS's resends of the third get their ACK
    broker.start()
    send_until_acked(frames[2])

    def arrived() -> bool:
        ids = collector.pos_ids()
        with collector.lock:
            dropped = sum(
                e["data"]["streams"].get("traffic", 0)
                for e in collector.events
                if e["type"] == "system.dropped"
            )
            sent_traffic = sum(e["type"] == "traffic.summary" for e in collector.events)
        return len(ids) == 3 and dropped > 0 and dropped + sent_traffic >= TRAFFIC

    assert wait_until(arrived, 60), (
        f"the POS sales, the traffic left and system.dropped upstream: {agent.tail()}"
    )
    with collector.lock:
        drops = [e for e in collector.events if e["type"] == "system.dropped"]
        traffic_up = {e["data"]["present"] for e in collector.events if e["type"] == "traffic.summary"}
    assert drops[0]["data"]["reason"] == "buffer_cap"
    assert set(drops[0]["data"]["streams"]) == {"traffic"}  # never a POS transaction
    dropped = sum(d["data"]["streams"]["traffic"] for d in drops)
    assert dropped + len(traffic_up) == TRAFFIC
    assert traffic_up == set(range(TRAFFIC - len(traffic_up), TRAFFIC))  # the oldest were the ones dropped
    assert_once_each(
        collector, ["R1-000001", "R1-000002", "R1-000003"], {"R1-000001", "R1-000002", "R1-000003"}
    )
    assert wait_until(lambda: buffer_events(config, tmp_path) == 0, 30), "an empty buffer"
