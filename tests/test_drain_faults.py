"""kill -9 of the broker during a drain, with the real agent process: nothing lost, resumes by itself."""

from __future__ import annotations

import os
import signal

import paho.mqtt.publish as publish

from agent.core.envelope import Event
from tests.support.agentproc import AgentProcess, prefill, write_config
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector

EVENTS = 100_000  # big enough that the freeze comes mid-drain even with a lagging subscriber


def test_broker_killed_mid_drain_loses_nothing(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    config = write_config(tmp_path / "agent.toml", data, port, mqtt_extra="inflight = 4\nbatch_size = 100")
    # an offline backlog, committed into the agent's own buffer file before it starts
    expected = set(prefill(data, [Event("app.x", {"i": i}, "api") for i in range(EVENTS)], chunk_events=100))

    broker = Mosquitto(tmp_path / "mq", port=port).start()
    first = Collector(port, "retail/acme/s1/a1/up/#", client_id="c1").start()
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    second = None
    try:
        assert first.wait_for(lambda c: len(c.events) >= 2_000, 30), agent.log_text()[-2000:]
        # freeze the agent mid-drain, then let the subscriber catch up with what the broker already
        # took (a marker published after it arrives after it): a broker killed with acknowledged
        # messages still queued for a slow subscriber loses them, and that is the broker's loss
        os.kill(agent.pid, signal.SIGSTOP)
        publish.single("retail/acme/s1/a1/up/marker", b'{"agent":"marker","events":[]}', qos=1,
                       hostname="127.0.0.1", port=port)
        assert first.wait_for(lambda c: "retail/acme/s1/a1/up/marker" in c.by_topic, 30)
        broker.kill()  # with batches in flight: published, or acknowledged but not yet seen by the agent
        assert len(first.ids()) < EVENTS, "the kill must come mid-drain"
        # the agent stays frozen while the broker comes back, so that the new subscriber is in place
        # before it can publish again (the broker drops what nobody subscribed to)
        first.stop()
        broker.start()
        second = Collector(port, "retail/acme/s1/a1/up/#", client_id="c2").start()
        os.kill(agent.pid, signal.SIGCONT)
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
    finally:
        if agent.alive():
            os.kill(agent.pid, signal.SIGCONT)
            assert agent.stop() == 0
        if second is not None:
            second.stop()
        broker.stop()
