"""Simulated store agents for the ingest's tests and bench: realistic uplink batches and a publisher.

A `SimAgent` numbers its events the way the real agent does (`seq` strictly increasing, UUIDv7
ids from agent.core.envelope) and builds the batch payload of contract section 3. A
`Publisher` sends payloads at QoS 1 and sends again whatever was not acknowledged, as the agent
does, so a broker restart turns into duplicates, never into a loss.
"""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.envelope import UtcFormatter, Uuid7

SKUS = [f"{n:013d}" for n in range(4006381333900, 4006381334000)]


class SimAgent:
    """One agent's identity and counters; `batch` makes the next `n` events."""

    def __init__(self, tenant: str, store: str, agent: str, prefix: str = "retail", seed: int = 0) -> None:
        self.tenant, self.store, self.agent, self.prefix = tenant, store, agent, prefix
        self.seq = 0
        self.rng = random.Random(seed)
        self.ids = Uuid7(self.rng)
        self.fmt = UtcFormatter()

    def topic(self, stream: str = "pos") -> str:
        return f"{self.prefix}/{self.tenant}/{self.store}/{self.agent}/up/{stream}"

    def event(self, now_ms: int) -> dict[str, Any]:
        """The next event: a sale, a scan or a presence reading, with the data a real one carries."""
        self.seq += 1
        r = self.rng.random()
        if r < 0.5:
            items = [
                {
                    "sku": self.rng.choice(SKUS),
                    "qty": self.rng.randint(1, 3),
                    "price": self.rng.randint(99, 4999),
                }
                for _ in range(self.rng.randint(1, 4))
            ]
            kind, source = "pos.sale", "pos:front-1"
            data: dict[str, Any] = {
                "receipt": f"R{self.seq:08d}",
                "till": "1",
                "items": items,
                "total": sum(i["qty"] * i["price"] for i in items),
                "currency": "EUR",
            }
        elif r < 0.8:
            kind, source = "scan.read", "scanner:pickup-desk"
            data = {
                "symbology": "ean13",
                "code": self.rng.choice(SKUS),
                "gs1": {"01": "0" + self.rng.choice(SKUS)},
            }
        else:
            kind, source = "presence.seen", "ble:hci0"
            data = {
                "tag": f"tag-{self.rng.randint(1, 40)}",
                "rssi": -self.rng.randint(40, 90),
                "zone": "entrance",
            }
        return {
            "id": self.ids.make(now_ms),
            "seq": self.seq,
            "ts": self.fmt.format(now_ms),
            "type": kind,
            "source": source,
            "tenant": self.tenant,
            "store": self.store,
            "agent": self.agent,
            "data": data,
        }

    def events(self, n: int, now_ms: int | None = None) -> list[dict[str, Any]]:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        return [self.event(now_ms) for _ in range(n)]

    def payload(self, events: list[dict[str, Any]]) -> bytes:
        return orjson.dumps({"agent": self.agent, "events": events})


class Publisher:
    """A QoS 1 publisher that sends again what the broker did not acknowledge (at least once)."""

    RESEND_S = 3.0

    def __init__(self, port: int, client_id: str, inflight: int = 20) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(inflight)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port, 30)
        self.client.loop_start()
        self.resent = 0

    def send_all(self, messages: list[tuple[str, bytes]], timeout_s: float = 60.0) -> None:
        """Publish every (topic, payload); resend any not acknowledged within `RESEND_S`."""
        deadline = time.monotonic() + timeout_s
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        now = time.monotonic()
        pending = [(t, p, self.client.publish(t, p, qos=1), now) for t, p in messages]
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} messages not acknowledged by the broker")
            still = []
            for topic, payload, info, sent_at in pending:
                if _acked(info):
                    continue
                if time.monotonic() - sent_at > self.RESEND_S and self.client.is_connected():
                    info, sent_at = self.client.publish(topic, payload, qos=1), time.monotonic()
                    self.resent += 1
                still.append((topic, payload, info, sent_at))
            pending = still
            if pending:
                time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # not sent (disconnected): it is sent again later
        return False
