"""The daemon as systemd runs it: READY=1 after the buffer opens, WATCHDOG=1 while healthy, clean SIGTERM."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

from agent.core.envelope import Event
from tests.support.agentproc import STORE_AGENT, AgentProcess, prefill, status_json, wait_until, write_config
from tests.support.mosquitto import free_port
from tests.support.subscriber import Collector


def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock, path


def received(sock, messages):
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except (TimeoutError, BlockingIOError):
        pass
    return messages


def test_ready_watchdog_and_clean_sigterm(tmp_path, broker):
    sock, path = notify_socket(tmp_path)
    api_port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", broker.port, api_port=api_port)
    agent = AgentProcess(
        config, tmp_path / "agent.log", env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    ).start()
    collector = Collector(broker.port, "retail/#").start()
    messages: list[str] = []
    try:
        assert wait_until(lambda: any("READY=1" in m for m in received(sock, messages)), 20), agent.log_text()
        assert wait_until(lambda: any(m == "WATCHDOG=1" for m in received(sock, messages)), 10)
        # the loopback status API answers while it runs
        # the broker is up: the agent is connected, and says so
        states: list[dict] = []
        assert wait_until(
            lambda: states.append(status_json(config)) or states[-1]["connection"]["connected"] is True, 20
        ), (states[-1:], agent.log_text())
        assert states[-1]["running"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=5) as r:
            assert json.loads(r.read())["ok"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as r:
            text = r.read().decode()
            assert "store_agent_buffer_events" in text and "store_agent_mqtt_connected" in text
        t0 = time.monotonic()
        assert agent.stop(timeout=15) == 0
        assert time.monotonic() - t0 < 15
        received(sock, messages)
        assert "STOPPING=1" in messages
        assert collector.wait_for(
            lambda c: any(t.endswith("/state") and b'"online":false' in p for t, p, _ in c.messages), 10
        ), "a clean stop says offline"
    finally:
        if agent.alive():
            agent.kill()
        collector.stop()
        sock.close()


def test_events_buffered_before_start_are_sent_and_a_second_agent_is_refused(tmp_path, broker):
    data = tmp_path / "data"
    ids = prefill(data, [Event("pos.sale", {"i": i}, "pos:1") for i in range(100)])
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    config = write_config(tmp_path / "agent.toml", data, broker.port)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert collector.wait_for(lambda c: c.ids() >= set(ids), 20)
        second = subprocess.run(
            [STORE_AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1 and "another agent is running" in second.stderr
        assert wait_until(lambda: status_json(config)["buffer"]["events"] == 0, 10)
    finally:
        agent.stop()
        collector.stop()


def test_corrupt_buffer_at_start_is_quarantined_and_reported_upstream(tmp_path, broker):
    data = tmp_path / "data"
    data.mkdir()
    (data / "buffer.db").write_bytes(b"garbage, not SQLite" * 512)
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    agent = AgentProcess(
        write_config(tmp_path / "agent.toml", data, broker.port), tmp_path / "agent.log"
    ).start()
    try:
        assert collector.wait_for(
            lambda c: any(e["type"] == "system.buffer_quarantined" for e in c.events), 20
        )
        assert [p.name for p in data.iterdir() if ".corrupt-" in p.name], "the bad file is kept"
        assert "Traceback" not in agent.log_text()
    finally:
        agent.stop()
        collector.stop()


def test_a_fresh_subscriber_sees_offline_after_a_kill_9(tmp_path, broker):
    """The will, not a clean stop: after kill -9 the retained `state` a new subscriber gets is
    `{"online": false}` (the broker publishes the will when the dead agent's socket closes)."""
    config = write_config(
        tmp_path / "agent.toml", tmp_path / "data", broker.port, mqtt_extra="keepalive_s = 5"
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    state_topic = "retail/acme/s1/a1/state"
    try:
        first = Collector(broker.port, state_topic, client_id="first").start()
        try:
            assert first.wait_for(lambda c: any(json.loads(p)["online"] for _, p, _ in c.messages), 20), (
                agent.log_text()
            )
        finally:
            first.stop()
        agent.kill()

        def retained_offline(c: Collector) -> bool:
            return any(retain and json.loads(p)["online"] is False for _, p, retain in c.messages)

        # the will may be published a moment after the kill: subscribe again until it is retained
        def sees_offline() -> bool:
            c = Collector(broker.port, state_topic, client_id=f"fresh-{time.monotonic()}").start()
            try:
                return c.wait_for(retained_offline, 1.0)
            finally:
                c.stop()

        assert wait_until(sees_offline, 20, interval=0.2)
    finally:
        if agent.alive():
            agent.kill()
