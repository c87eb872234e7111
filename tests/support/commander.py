"""A real MQTT 5 client playing the cloud: publishes commands, collects replies (for tests and benches)."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.subscriber import start_client, stop_client
from tests.support.wait import wait_until


def sign(private_key: Any, key_id: str, name: str, msg: dict[str, Any]) -> dict[str, Any]:
    """`msg` with its `sig` (contract section 3: Ed25519 over the canonical JSON's UTF-8 bytes)."""
    doc = {"args": msg.get("args", {}), "expires": msg.get("expires"), "id": msg.get("id"), "name": name}
    signed = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {**msg, "sig": {"key": key_id, "value": base64.b64encode(private_key.sign(signed)).decode()}}


class Commander:
    """Publishes to `{base}/cmd/{name}` and keeps every payload on `{base}/reply` and `resp/#`."""

    def __init__(self, port: int, base: str = "retail/acme/s1/a1", client_id: str = "test-cloud") -> None:
        self.port = port
        self.base = base
        self.store_base = base.rsplit("/", 1)[0]
        self.lock = threading.Lock()
        self.replies: list[tuple[str, bytes, bytes | None, float]] = []  # topic, payload, correlation, time
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe([(f"{base}/reply", 1), ("resp/#", 1)])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties is not None else None
        with self.lock:
            self.replies.append((msg.topic, bytes(msg.payload), corr, time.perf_counter()))

    def start(self, timeout: float = 10.0) -> Commander:
        start_client(self.client, self.port, self.subscribed, timeout, "commander", nodelay=True)
        return self

    def stop(self) -> None:
        stop_client(self.client)

    def send(
        self,
        name: str,
        body: dict[str, Any] | bytes,
        *,
        everyone: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> float:
        """Publish a command (QoS 1, waits for the PUBACK); returns when it was handed to paho."""
        topic = f"{self.store_base}/all/cmd/{name}" if everyone else f"{self.base}/cmd/{name}"
        payload = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        sent = time.perf_counter()
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
        return sent

    def on(self, topic_end: str, cid: str) -> list[bytes]:
        """Every payload received on a topic ending with `topic_end` whose reply id is `cid`."""
        with self.lock:
            return [p for t, p, _c, _t in self.replies if t.endswith(topic_end) and _id(p) == cid]

    def wait_reply(self, cid: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first reply on `reply` to `cid` (fails the test after `timeout`)."""
        assert wait_until(lambda: self.on("/reply", cid), timeout), f"no reply to {cid}"
        return dict(orjson.loads(self.on("/reply", cid)[0]))

    def wait_serving(self, timeout: float = 20.0) -> bool:
        """Wait until the agent answers commands (its subscription is made after its CONNACK):
        a `status` probe is sent again every half second until one is answered."""
        import uuid

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = f"probe-{uuid.uuid4()}"
            self.send("status", {"id": probe})
            if wait_until(lambda probe=probe: self.on("/reply", probe), 0.5):
                return True
        return False

    def reply_time(self, cid: str) -> float | None:
        with self.lock:
            for t, p, _c, at in self.replies:
                if t.endswith("/reply") and _id(p) == cid:
                    return at
        return None


def _id(payload: bytes) -> str | None:
    try:
        return str(orjson.loads(payload).get("id"))
    except (orjson.JSONDecodeError, AttributeError):
        return None
