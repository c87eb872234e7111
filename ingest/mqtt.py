"""The ingest's one MQTT 5 session: shared subscription, persistent session, manual acks.

- `clean_start=False` with a session expiry > 0: what the broker sent and we did not acknowledge
  stays in our session across a crash or a restart of this instance, and is sent again when the
  same `client_id` comes back.
- `manual_ack=True`: paho does not PUBACK on receipt; `ack()` is called only once the message's
  rows (or its reject) are committed in PostgreSQL.
- The subscription is made again in every `on_connect`: a broker may forget shared subscriptions
  when it restarts, and a resumed session must not depend on it remembering.
- Acks are tagged with the connection they belong to. After a reconnect the broker resends what
  was unacknowledged with the same packet ids, so acking an old packet id on the new connection
  could acknowledge a message we never received if the broker lost the session (a restart
  without persistence): acks of an earlier connection are dropped instead; the broker resends
  those messages and the id ledger makes the copy land once.
- Receive Maximum bounds how many unacknowledged messages the broker may have in flight to us,
  which is what lets one transaction hold many messages.

paho's network loop runs in its own thread (`loop_start`) and reconnects by itself with backoff;
`on_message` only stamps the time and queues the message for the batch thread.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import read_secret
from ingest.config import IngestConfig
from ingest.envelope import subscription

log = logging.getLogger("ingest.mqtt")


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    mid: int
    qos: int
    conn: int  # which connection it came on
    received_at: float


class Session:
    """Connects, subscribes on every connect, queues deliveries, acks committed ones."""

    def __init__(self, cfg: IngestConfig, deliveries: queue.Queue[Delivery]) -> None:
        self.cfg = cfg
        self.deliveries = deliveries
        self.topic = subscription(cfg.ingest.group, cfg.mqtt.topic_prefix)
        self._lock = threading.Lock()
        self._conn = 0  # incremented on every connect and disconnect
        self.connected = threading.Event()
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.ingest.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if m.username:
            client.username_pw_set(m.username, read_secret(m.password_file))
        if m.tls:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=m.ca_file)
            if m.cert_file and m.key_file:
                context.load_cert_chain(m.cert_file, m.key_file)
            client.tls_set_context(context)
        client.connect_timeout = 5.0
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until `stop`."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.ingest.session_expiry_s
        props.ReceiveMaximum = self.cfg.ingest.receive_maximum
        self.client.connect_async(
            self.cfg.mqtt.host,
            self.cfg.mqtt.port,
            self.cfg.mqtt.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (the session and its unacked messages stay on the broker)."""
        with self._lock:
            self._conn += 1
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def ack(self, deliveries: list[Delivery]) -> int:
        """PUBACK each delivery that came on the current connection; returns how many were sent."""
        sent = 0
        with self._lock:
            for d in deliveries:
                if d.conn == self._conn and d.qos > 0:
                    self.client.ack(d.mid, d.qos)
                    sent += 1
        return sent

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        with self._lock:
            self._conn += 1
        session = "resumed" if flags.session_present else "new"
        log.info(
            "connected to %s:%d (%s session); subscribing to %s",
            self.cfg.mqtt.host,
            self.cfg.mqtt.port,
            session,
            self.topic,
        )
        client.subscribe(self.topic, qos=1)
        self.connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("subscription to %s refused: %s", self.topic, reason)
            else:
                log.info("subscribed to %s", self.topic)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._lock:
            self._conn += 1
        self.connected.clear()
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.deliveries.put(
            Delivery(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._conn, time.time())
        )
