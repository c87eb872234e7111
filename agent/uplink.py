"""Sync: the buffered events go upstream over MQTT, and leave the buffer only after their PUBACK.

One thread owns the MQTT session and drives paho's socket itself (select over the broker socket
and a wake-up pipe), so there is no callback spaghetti across threads: PUBACKs are handled where
the publishes were made. Each connection is a fresh paho client; nothing of an old session's
in-flight state survives a reconnect. The backlog is simply read again from the buffer, oldest
first, and what the broker had acknowledged was deleted before that read.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.buffer import Chunk, Outbox, read_chunks
from agent.config import AgentConfig, read_secret
from agent.core.backoff import Backoff
from agent.core.envelope import UtcFormatter, batch_bytes

log = logging.getLogger(__name__)

CONNACK_TIMEOUT_S = 10.0


class BrokerUnavailable(Exception):
    """The broker could not be reached, refused us, or the TLS handshake failed."""


@dataclass
class UplinkStatus:
    """What `status`, /healthz and /metrics say about the connection."""

    configured: bool
    connected: bool = False
    since: float | None = None
    reconnects: int = 0
    last_error: str | None = None
    next_attempt_s: float | None = None
    published_batches: int = 0
    inflight: int = 0


def make_client(cfg: AgentConfig, state_topic: str, offline: bytes) -> mqtt.Client:
    """A paho client set up from the config: identity, will, credentials and TLS."""
    client_id = cfg.mqtt.client_id or f"store-agent-{cfg.agent.tenant}-{cfg.agent.store}-{cfg.agent.id}"
    protocol = mqtt.MQTTv5 if cfg.mqtt.protocol == "5" else mqtt.MQTTv311
    kwargs: dict[str, Any] = {}
    if protocol == mqtt.MQTTv311:
        kwargs["clean_session"] = True
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    client.will_set(state_topic, offline, qos=1, retain=True)
    if cfg.mqtt.username:
        client.username_pw_set(cfg.mqtt.username, read_secret(cfg.mqtt.password_file))
    if cfg.mqtt.tls:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.mqtt.ca_file)
        if cfg.mqtt.cert_file and cfg.mqtt.key_file:
            context.load_cert_chain(cfg.mqtt.cert_file, cfg.mqtt.key_file)
        client.tls_set_context(context)
    client.connect_timeout = 5.0
    return client


class Uplink:
    """The MQTT session thread: connect, publish the backlog in batches, delete after PUBACK."""

    # Longest wait for socket activity when idle; new events wake the thread at once (`kick`).
    IDLE_WAIT_S = 1.0

    def __init__(
        self,
        cfg: AgentConfig,
        outbox: Outbox,
        *,
        metrics: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self._metrics = metrics
        self._clock = clock
        base = cfg.topic_base
        self.state_topic = f"{base}/state"
        self.metrics_topic = f"{base}/metrics"
        self.up_prefix = f"{base}/up/"
        self._agent_json = orjson.dumps(cfg.agent.id)
        self.status = UplinkStatus(configured=cfg.mqtt.host is not None)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._kicked = False
        self._now_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._fmt = UtcFormatter()
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, list[Chunk]] = {}
        self._published: set[int] = set()
        self._cursor = 0
        self._lost = False
        self._connack: int | None = None
        self._stop_deadline = 0.0
        outbox.on_committed(self.kick)

    # ---- control, from any thread ------------------------------------------------------------

    def start(self) -> Uplink:
        """Start the session thread."""
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Send what is in flight (waiting at most `timeout`), say offline, disconnect."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout + CONNACK_TIMEOUT_S)
        self._wake_r.close()
        self._wake_w.close()

    @property
    def max_event_bytes(self) -> int:
        """The largest single envelope that can ever be sent (the local API refuses bigger ones: 413)."""
        return self.cfg.mqtt.batch_max_bytes

    @property
    def alive(self) -> bool:
        """True while the session thread runs (connected or not)."""
        return self._thread is not None and self._thread.is_alive()

    def kick(self) -> None:
        """New events are buffered: wake the session thread (cheap; coalesced)."""
        if not self._kicked:
            self._kicked = True
            self._wake()

    def attempt_now(self) -> None:
        """Skip the rest of the backoff delay and try the broker now (`drain`)."""
        self._now_flag.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except (BlockingIOError, OSError):
            pass

    # ---- the session thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.cfg.mqtt.host is None:
            log.warning("no [mqtt] host configured: buffering only, nothing is sent")
            self._stop.wait()
            return
        while not self.outbox.checked.wait(0.2):  # never send from a file not yet known sound
            if self._stop.is_set():
                return
        backoff = Backoff(cap=self.cfg.mqtt.backoff_max_s)
        while not self._stop.is_set():
            try:
                client = self._connect()
            except BrokerUnavailable as exc:
                delay = backoff.next_delay()
                self.status.last_error = str(exc)
                self.status.next_attempt_s = delay
                log.warning("broker %s:%s unavailable: %s; next attempt in %.1f s",
                            self.cfg.mqtt.host, self.cfg.mqtt.port, exc, delay)
                self._sleep(delay)
                continue
            backoff.reset()
            self.status.next_attempt_s = None
            try:
                self._serve(client)
            except BrokerUnavailable as exc:
                log.warning("broker connection failed: %s", exc)
                self.status.last_error = str(exc)
            except Exception as exc:  # a bug must not end the thread: log, reconnect
                log.exception("uplink session failed: %s", exc)
                self.status.last_error = f"session failed: {exc}"
            finally:
                self._teardown(client)
            if not self._stop.is_set():
                self.status.reconnects += 1
                self._sleep(backoff.next_delay())

    def _sleep(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        self._now_flag.clear()
        while not self._stop.is_set() and not self._now_flag.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._wake_r], [], [], left)
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # after the bytes are read: a kick that finds the flag still set sent no byte, but its
        # commit came before this line, so the `_fill` that follows reads it
        self._kicked = False

    def _connect(self) -> mqtt.Client:
        offline = orjson.dumps({"online": False, "version": __version__})
        client = make_client(self.cfg, self.state_topic, offline)
        self._connack = None
        self._lost = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.max_inflight_messages_set(self.cfg.mqtt.inflight + 2)
        host = self.cfg.mqtt.host
        assert host is not None  # _run does not connect without one
        try:
            if self.cfg.mqtt.protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0
                client.connect(host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive_s,
                               clean_start=True, properties=props)
            else:
                client.connect(host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive_s)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(f"TLS handshake failed: {exc.reason or exc}") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if self.cfg.mqtt.tls:  # the TCP connection was made: it is the handshake that failed
                raise BrokerUnavailable(f"TLS handshake failed: {exc}") from None
            raise BrokerUnavailable(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from None
        sock = client.socket()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None:
            if time.monotonic() > deadline or self._stop.is_set() or not self._pump(client, 0.5):
                self._teardown(client)
                raise BrokerUnavailable("no CONNACK from the broker")
        if self._connack != 0:
            reason = self._connack
            self._teardown(client)
            raise BrokerUnavailable(f"broker refused the connection: {mqtt.connack_string(reason)}"
                                    if isinstance(reason, int) else f"broker refused the connection: {reason}")
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connack = 0 if not reason.is_failure else reason.value

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._lost = True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        chunks = self._inflight.pop(mid, None)
        if chunks is None:
            return
        if reason is not None and getattr(reason, "is_failure", False):
            # the broker refused this batch (e.g. not authorised): keep it, try again later
            log.error("broker refused a batch on %s: %s", chunks[0].stream, reason)
            self.status.last_error = f"broker refused a batch: {reason}"
            self._lost = True
            return
        self.outbox.acked(chunks)

    def _pump(self, client: mqtt.Client, timeout: float) -> bool:
        """One round of socket I/O; False when the connection is gone."""
        sock = client.socket()
        if sock is None:
            return False
        wlist = [sock] if client.want_write() else []
        try:
            readable, writable, _ = select.select([sock, self._wake_r], wlist, [], timeout)
        except (OSError, ValueError):
            return False
        if self._wake_r in readable:
            self._drain_wake()
        if sock in readable:
            if client.loop_read(256) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return False
        if writable or client.want_write():
            if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return False
        if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        return not self._lost

    def _serve(self, client: mqtt.Client) -> None:
        self.outbox.flush()  # acknowledged deletions are written before the backlog is read again
        self._cursor = 0
        self._inflight.clear()
        self._published.clear()
        self._client = client
        now = self._clock()
        self.status.connected = True
        self.status.since = now
        self.status.last_error = None
        log.info("connected to broker %s:%s", self.cfg.mqtt.host, self.cfg.mqtt.port)
        online = orjson.dumps({"online": True, "version": __version__, "since": self._fmt.format(int(now * 1000))})
        self._check(client.publish(self.state_topic, online, qos=1, retain=True))
        next_metrics = time.monotonic() + min(5.0, self.cfg.mqtt.metrics_interval_s)
        try:
            while True:
                stopping = self._stop.is_set()
                if not stopping:
                    self._fill(client)
                elif not self._inflight or time.monotonic() > self._stop_deadline:
                    break
                if time.monotonic() >= next_metrics:
                    self._publish_metrics(client)
                    next_metrics = time.monotonic() + self.cfg.mqtt.metrics_interval_s
                idle = max(0.0, min(self.IDLE_WAIT_S, next_metrics - time.monotonic()))
                timeout = 0.2 if stopping else idle
                if not self._pump(client, timeout):
                    log.warning("lost the broker connection")
                    self.status.last_error = "connection lost"
                    return
            offline = orjson.dumps({"online": False, "version": __version__})
            info = client.publish(self.state_topic, offline, qos=1, retain=True)
            deadline = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < deadline and self._pump(client, 0.1):
                pass
            client.disconnect()
            self._pump(client, 0.1)
        finally:
            self.status.connected = False
            self.status.inflight = 0
            self._client = None

    def _check(self, info: mqtt.MQTTMessageInfo) -> int:
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost = True
            raise BrokerUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
        return info.mid

    def _fill(self, client: mqtt.Client) -> None:
        """Publish batches from the buffer, oldest first, while the in-flight window has room.

        `_cursor` is the seq below which everything has been published in this session;
        `_published` holds the seqs above it that were published out of order (a batch of
        one stream can go before an older chunk of another stream once the window is full).
        """
        window = self.cfg.mqtt.inflight
        while len(self._inflight) < window:
            free = window - len(self._inflight)
            read = read_chunks(self.outbox.read_conn(), self._cursor, free * 64,
                               max_bytes=free * self.cfg.mqtt.batch_max_bytes)
            if not read:
                return
            batches = self._batches([c for c in read if c.seq not in self._published])
            for batch in batches[:free]:
                payload = batch_bytes(self._agent_json, b",".join(c.body for c in batch))
                mid = self._check(client.publish(self.up_prefix + batch[0].stream, payload, qos=1))
                self._inflight[mid] = batch
                self._published.update(c.seq for c in batch)
                self.status.published_batches += 1
            self.status.inflight = len(self._inflight)
            unsent = [c.seq for b in batches[free:] for c in b]
            self._cursor = max(self._cursor, (min(unsent) - 1) if unsent else read[-1].seq)
            self._published = {seq for seq in self._published if seq > self._cursor}
            if unsent:
                return

    def _batches(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Group chunks per stream into batches within the size limits, in order of their oldest."""
        limit_events = self.cfg.mqtt.batch_size
        limit_bytes = self.cfg.mqtt.batch_max_bytes
        open_batches: dict[str, tuple[list[Chunk], list[int]]] = {}
        done: list[list[Chunk]] = []
        for chunk in chunks:
            current = open_batches.get(chunk.stream)
            if current is not None:
                batch, size = current
                if size[0] + chunk.n > limit_events or size[1] + len(chunk.body) > limit_bytes:
                    current = None
            if current is None:
                batch, size = [], [0, 0]
                open_batches[chunk.stream] = (batch, size)
                done.append(batch)
            batch.append(chunk)
            size[0] += chunk.n
            size[1] += len(chunk.body)
        return done

    def _publish_metrics(self, client: mqtt.Client) -> None:
        if self._metrics is None:
            return
        try:
            payload = json.dumps(self._metrics(), separators=(",", ":")).encode()
        except Exception as exc:  # metrics must never take the session down
            log.warning("metrics not published: %s", exc)
            return
        info = client.publish(self.metrics_topic, payload, qos=0)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("metrics not published: %s", mqtt.error_string(info.rc))

    def _teardown(self, client: mqtt.Client) -> None:
        self._inflight.clear()
        self._published.clear()
        self.status.connected = False
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
