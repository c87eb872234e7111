"""A real MQTT subscriber that collects what the agent publishes, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.wait import wait_until


def start_client(
    client: mqtt.Client,
    port: int,
    subscribed: threading.Event,
    timeout: float,
    who: str,
    *,
    nodelay: bool = False,
) -> None:
    """Connect `client` to the loopback broker on `port` (again while it is not yet listening, up to
    `timeout`), start paho's network thread and wait until `subscribed` is set (its on_subscribe).

    `nodelay` turns Nagle off before the loop starts: for stop-and-wait small packets Nagle would
    add a delayed ACK's 40 ms."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect("127.0.0.1", port, 30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock = client.socket()
    if nodelay and sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not subscribed.wait(timeout):
        raise RuntimeError(f"{who} did not subscribe")


def stop_client(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


class Collector:
    """Subscribes to `topic` (QoS 1) and keeps every event envelope it receives."""

    def __init__(self, port: int, topic: str = "#", client_id: str = "test-collector") -> None:
        self.port = port
        self.topic = topic
        self.lock = threading.RLock()  # wait_for predicates may call ids()
        self.events: list[dict[str, Any]] = []
        self.messages: list[tuple[str, bytes, bool]] = []
        self.by_topic: dict[str, list[bytes]] = defaultdict(list)
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.by_topic[msg.topic].append(msg.payload)
            if "/up/" in msg.topic:
                self.events.extend(orjson.loads(msg.payload)["events"])

    def start(self, timeout: float = 10.0) -> Collector:
        start_client(self.client, self.port, self.subscribed, timeout, "collector")
        return self

    def stop(self) -> None:
        stop_client(self.client)

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
        """Wait until `predicate(self)` is true; False after `timeout` seconds."""

        def holds() -> bool:
            with self.lock:
                return bool(predicate(self))

        return wait_until(holds, timeout, interval)

    def ids(self) -> set[str]:
        with self.lock:
            return {e["id"] for e in self.events}
