"""kill -9 of the broker during a drain, with the real agent process: nothing lost, resumes by itself."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.publish as publish

from agent.core.envelope import Event
from tests.support.agentproc import AgentProcess, prefill, wait_until, write_config
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector

EVENTS = 100_000  # big enough that the freeze comes mid-drain even with a lagging subscriber
UP = "retail/acme/s1/a1/up/#"
MARKER = "retail/acme/s1/a1/up/marker"


@dataclass
class Drain:
    """An agent draining a prefilled backlog into a real broker, and the subscribers watching it."""

    port: int
    expected: set[str]
    broker: Mosquitto
    agent: AgentProcess
    first: Collector
    second: Collector | None = None

    def freeze_and_catch_up(self) -> None:
        """Freeze the agent (SIGSTOP), then let the first subscriber catch up with what the broker
        already took (a marker published after it arrives after it)."""
        os.kill(self.agent.pid, signal.SIGSTOP)
        publish.single(MARKER, b'{"agent":"marker","events":[]}', qos=1, hostname="127.0.0.1", port=self.port)
        assert self.first.wait_for(lambda c: MARKER in c.by_topic, 30)

    def restart_broker(self) -> Collector:
        """The killed broker comes back while the agent stays frozen, so that the new subscriber is
        in place before the agent, let go, can publish again (the broker drops what nobody
        subscribed to)."""
        self.first.stop()
        self.broker.start()
        self.second = Collector(self.port, UP, client_id="c2").start()
        os.kill(self.agent.pid, signal.SIGCONT)
        return self.second


@contextmanager
def draining(tmp_path: Path, events: int) -> Iterator[Drain]:
    """The agent started on an offline backlog of `events`, committed into its own buffer file
    before it starts; at the end it is let go and must stop cleanly."""
    data = tmp_path / "data"
    port = free_port()
    config = write_config(tmp_path / "agent.toml", data, port, mqtt_extra="inflight = 4\nbatch_size = 100")
    expected = set(prefill(data, [Event("app.x", {"i": i}, "api") for i in range(events)], chunk_events=100))
    broker = Mosquitto(tmp_path / "mq", port=port).start()
    first = Collector(port, UP, client_id="c1").start()
    run = Drain(port, expected, broker, AgentProcess(config, tmp_path / "agent.log").start(), first)
    try:
        yield run
    finally:
        if run.agent.alive():
            os.kill(run.agent.pid, signal.SIGCONT)
            assert run.agent.stop() == 0
        if run.second is not None:
            run.second.stop()
        broker.stop()


def test_broker_killed_mid_drain_loses_nothing(tmp_path):
    with draining(tmp_path, EVENTS) as run:
        first, agent, expected = run.first, run.agent, run.expected
        assert first.wait_for(lambda c: len(c.events) >= 2_000, 30), agent.log_text()[-2000:]
        # freeze the agent mid-drain, then let the subscriber catch up with what the broker already
        # took: a broker killed with acknowledged messages still queued for a slow subscriber loses
        # them, and that is the broker's loss
        run.freeze_and_catch_up()
        run.broker.kill()  # with batches in flight: published, or acknowledged but not yet seen by the agent
        assert len(first.ids()) < EVENTS, "the kill must come mid-drain"
        second = run.restart_broker()
        assert second.wait_for(lambda c: expected <= (first.ids() | c.ids()), 60), (
            f"missing {len(expected - first.ids() - second.ids())}: {agent.log_text()[-2000:]}"
        )
        got = first.events + second.events
        assert {e["id"] for e in got} == expected
        # a redelivery is the same envelope (same id, same seq), never a second id for an event
        by_id = {}
        for e in got:
            assert by_id.setdefault(e["id"], e["seq"]) == e["seq"]
        # it noticed the loss and connected again by itself (the loss shows either way it is seen:
        # a failed read, or a failed publish)
        assert agent.log_text().count("connected to broker") >= 2


def _unread_bytes(port: int) -> int:
    """Bytes waiting, unread, in the receive queues of the broker's accepted sockets on `port`."""
    total = 0
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            state = fields[3]
            if local_port == port and state == "01":  # ESTABLISHED, the broker's side
                total += int(fields[4].split(":")[1], 16)
    return total


def test_broker_frozen_with_the_window_full_then_killed_loses_nothing(tmp_path):
    """Published, not yet acknowledged: the broker is frozen (SIGSTOP) while the agent fills its
    in-flight window, then killed (-9) and restarted. Every event arrives: the batches that were in
    flight are sent again, so the read cursor must start again on each connection."""
    events = 20_000
    with draining(tmp_path, events) as run:
        first, agent, expected, broker, port = run.first, run.agent, run.expected, run.broker, run.port
        assert first.wait_for(lambda c: len(c.events) >= 1_000, 30), agent.log_text()[-2000:]
        # let the subscriber catch up with everything the broker acknowledged (a marker behind it),
        # so that what the kill loses can only be what the agent has not had acknowledged
        run.freeze_and_catch_up()
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        os.kill(agent.pid, signal.SIGCONT)
        # the agent publishes its window into the frozen broker: bytes pile up unread, then stop growing
        assert wait_until(lambda: _unread_bytes(port) > 0, 20)
        sizes = [-1]

        def settled() -> bool:
            sizes.append(_unread_bytes(port))
            return sizes[-1] == sizes[-2]

        assert wait_until(settled, 20, interval=0.3)
        seen = first.ids()
        assert len(seen) < events, "the freeze must come mid-drain"
        os.kill(agent.pid, signal.SIGSTOP)  # so that the new subscriber is in place before it sends
        broker.kill()
        second = run.restart_broker()
        assert second.wait_for(lambda c: expected <= (seen | c.ids()), 60), (
            f"missing {len(expected - seen - second.ids())}: {agent.log_text()[-2000:]}"
        )
        assert agent.log_text().count("connected to broker") >= 2
