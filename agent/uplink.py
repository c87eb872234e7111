"""Sync: the buffered events go upstream over MQTT, and leave the buffer only after their PUBACK.

One thread owns the MQTT session and drives paho's socket itself (select over the broker socket
and a wake-up pipe), so there is no callback spaghetti across threads: PUBACKs are handled where
the publishes were made. Each connection is a fresh paho client; nothing of an old session's
in-flight state survives a reconnect. The backlog is simply read again from the buffer, oldest
first (the read cursor starts again at 0), and what the broker had acknowledged was deleted
before that read.

Reconnecting (agent/core/backoff.py has the argument): an attempt that nothing answered (refused,
unreachable, timed out) is retried every 1-4 s, so a broker that comes back is found within 4 s;
an attempt the broker answered with a failure (TLS, CONNACK refused or missing, a session that
dropped before it proved healthy) climbs the equal-jitter ladder to `backoff_max_s` (30 s). The
ladders start again only when a session proved healthy: a PUBACK for an event batch, or
`HEALTHY_AFTER_S` connected. A bare CONNACK proves nothing (a broker that accepts and then drops
the session would otherwise get four connections a second, forever).

No exception ends the thread: a failure while connecting (a password file gone since start, a
bug) is logged, shown in `status.last_error` and retried on the answer ladder.

Packet size and set-aside batches. MQTT 5's CONNACK may carry the broker's Maximum Packet Size;
batches are formed within it (and within `batch_max_bytes`), and `max_event_bytes` tells the
local API the largest envelope that can ever go out (413 at the door). What still cannot go is
set aside (agent/buffer/parked.py): kept in the buffer, counted in `UplinkStatus`, announced by a
`system.batch_set_aside` event, skipped by the backlog reads so it is never in front of the rest:
- a chunk bigger than the broker's packet limit (it cannot fit any batch);
- a batch the broker refused in its PUBACK (MQTT 5 reason code >= 0x80, e.g. 0x87 not
  authorised): never taken as success, and the session goes on with the rest;
- a batch that was the oldest in flight when the connection dropped, `STRIKES_TO_SET_ASIDE`
  sessions in a row without being acknowledged in between (a broker without the MQTT 5 property,
  MQTT 3.1.1 included, closes the connection on a packet too big). A broker outage gives the
  oldest batch a strike too, but it is acknowledged on the next session, which clears it.
Set-aside chunks are retried one at a time once the backlog is empty: at the first connection of
the process, after a `drain`, and every `PARKED_RETRY_S`. A batch acknowledged then leaves the
buffer like any other.

Commands (agent/commands/): every session subscribes to `{base}/cmd/+` and
`{prefix}/{tenant}/{store}/all/cmd/+` at QoS 1; each message is handed to the command channel's
queue (`CommandSink.submit`, never blocking this thread). Replies come back through
`send_reply` once their record is committed, and are published here on the live session at once,
ahead of any backlog of events; a reply's PUBACK is reported (`reply_acked`) so the channel marks
it delivered, and at every connect the channel hands back the replies still unacknowledged.

MQTT 3.1.1 cannot say "refused": a broker that denies a publish under 3.1.1 acknowledges it and
drops it. Nothing here can tell; the README says so and `doctor` warns.
"""

from __future__ import annotations

import errno
import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.buffer import Chunk, Outbox, read_chunks
from agent.buffer.parked import park, read_parked
from agent.config import AgentConfig, read_secret
from agent.core.backoff import ReconnectSchedule
from agent.core.envelope import Event, UtcFormatter, batch_bytes

log = logging.getLogger(__name__)

CONNACK_TIMEOUT_S = 10.0
# Bytes of a QoS 1 PUBLISH besides its topic and payload: fixed header (1 + up to 4 bytes of
# remaining length), topic length (2), packet id (2), MQTT 5 properties length (1).
PUBLISH_OVERHEAD = 10
# Room kept for the stream's name when `max_event_bytes` is answered for any stream.
STREAM_NAME_ALLOWANCE = 64
# Batches' worth of chunks read from the buffer at a time while the window has room: reading the
# whole window at once (16 x 256 KB) held 4 MB of bodies beside their payloads (+2.5 MB peak RSS
# in `bench/core.py drain`, the peak of a whole offline-backlog run), for no gain in speed.
READ_BATCHES = 4


class BrokerUnavailable(Exception):
    """The broker could not be reached, refused us, or the TLS handshake failed.

    `answered`: something answered the attempt with a failure (TLS, CONNACK, a local error), as
    opposed to nothing listening or reachable at the address; it picks the reconnect ladder.
    """

    def __init__(self, message: str, *, answered: bool = True) -> None:
        super().__init__(message)
        self.answered = answered


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
    max_packet_bytes: int | None = None  # the broker's Maximum Packet Size (last CONNACK), if it said
    set_aside_total: int = 0  # batches set aside since start (too big, refused, or dropping the session)
    set_aside_chunks: int = 0  # buffer rows set aside right now (kept; retried later)
    set_aside_events: int = 0  # events in those rows
    last_set_aside: str | None = None  # why the last batch was set aside


class CommandSink(Protocol):
    """What the uplink needs of the command channel; each call must return at once."""

    def submit(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None: ...

    def connected(self) -> None: ...

    def reply_acked(self, command_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's stored reply, to publish on `reply` (and the MQTT 5 response topic, if any)."""

    command_id: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None


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
    # A session connected this long (or with a batch acknowledged) proved healthy: ladders reset.
    HEALTHY_AFTER_S = 10.0
    # Sessions in a row that dropped with the same batch oldest in flight before it is set aside.
    STRIKES_TO_SET_ASIDE = 3
    # Set-aside chunks are retried this often (and at the first connection, and on `drain`).
    PARKED_RETRY_S = 3600.0

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
        self.reply_topic = f"{base}/reply"
        m, a = cfg.mqtt, cfg.agent
        self.command_topics = [f"{base}/cmd/+", f"{m.topic_prefix}/{a.tenant}/{a.store}/all/cmd/+"]
        self.commands: CommandSink | None = None
        # waiting for the session thread, one per request: a repeated command id gets its reply
        # again (contract section 3), to its own response topic and correlation data
        self._replies: list[Reply] = []
        self._replies_lock = threading.Lock()
        self._reply_mids: dict[int, str] = {}  # mid of a published `reply` -> its command id
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
        self._connack_max_packet: int | None = None
        self._stop_deadline = 0.0
        self._healthy = False
        self._schedule: ReconnectSchedule | None = None
        self._connected_at = 0.0
        self._strikes: dict[int, int] = {}  # first seq of a batch -> sessions it dropped with
        self._parked: dict[int, int] = {}  # set-aside chunks: seq -> events
        self._parked_loaded = False
        self._retry_due = 0.0  # monotonic time of the next retry pass over set-aside chunks
        self._retry_queue: list[int] = []
        self._retrying: int | None = None  # mid of the set-aside chunk being retried
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
        """The largest single envelope that can ever be sent (the local API refuses bigger ones: 413).

        From the last CONNACK's Maximum Packet Size when the broker gave one (less the PUBLISH's
        own bytes, the topic with room for any stream's name, and the batch's wrapping), else the
        config's `batch_max_bytes`.
        """
        limit = self.status.max_packet_bytes
        if limit is None:
            return self.cfg.mqtt.batch_max_bytes
        return max(0, limit - self._packet_overhead(" " * STREAM_NAME_ALLOWANCE))

    def _packet_overhead(self, stream: str) -> int:
        """Bytes of a batch's PUBLISH packet that are not its joined envelopes."""
        topic = len((self.up_prefix + stream).encode())
        return PUBLISH_OVERHEAD + topic + len(batch_bytes(self._agent_json, b""))

    def _joined_limit(self, stream: str) -> int | None:
        """The most bytes of joined envelopes one batch of `stream` may carry (None: no limit)."""
        limit = self.status.max_packet_bytes
        return None if limit is None else limit - self._packet_overhead(stream)

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
        """Skip the rest of the backoff delay and try the broker now (`drain`); set-aside chunks
        are tried again too, once the rest has gone."""
        self._retry_due = 0.0
        self._now_flag.set()
        self._wake()

    def send_reply(self, reply: Reply) -> None:
        """Publish a stored reply on the live session as soon as possible (any thread)."""
        with self._replies_lock:
            self._replies.append(reply)
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
        schedule = ReconnectSchedule(cap=self.cfg.mqtt.backoff_max_s)
        while not self._stop.is_set():
            try:
                self._session(schedule)
            except Exception as exc:  # last resort: the thread never ends while the agent runs
                log.exception("uplink failed: %s", exc)
                self.status.last_error = f"uplink failed: {exc}"
                self.status.connected = False
                self._sleep(schedule.next_delay(answered=True))

    def _session(self, schedule: ReconnectSchedule) -> None:
        """One connection attempt, the session if it succeeds, and the wait before the next."""
        try:
            client = self._connect()
        except BrokerUnavailable as exc:
            delay = schedule.next_delay(answered=exc.answered)
            self.status.last_error = str(exc)
            self.status.next_attempt_s = delay
            log.warning(
                "broker %s:%s unavailable: %s; next attempt in %.1f s",
                self.cfg.mqtt.host,
                self.cfg.mqtt.port,
                exc,
                delay,
            )
            self._sleep(delay)
            return
        except Exception as exc:  # e.g. a password or CA file gone since start: report, retry
            delay = schedule.next_delay(answered=True)
            self.status.last_error = f"cannot connect: {exc}"
            self.status.next_attempt_s = delay
            log.error("cannot connect to the broker: %s; next attempt in %.1f s", exc, delay)
            self._sleep(delay)
            return
        self.status.next_attempt_s = None
        try:
            self._serve(client, schedule)
        except BrokerUnavailable as exc:
            log.warning("broker connection failed: %s", exc)
            self.status.last_error = str(exc)
        except Exception as exc:  # a bug must not end the thread: log, reconnect
            log.exception("uplink session failed: %s", exc)
            self.status.last_error = f"session failed: {exc}"
        finally:
            self._session_lost()
            self._teardown(client)
        if not self._stop.is_set():
            self.status.reconnects += 1
            # a healthy session reset the ladders: the first attempts come quickly; one that
            # never proved healthy counts as the broker answering with a failure
            delay = schedule.next_delay(answered=not self._healthy)
            self.status.next_attempt_s = delay
            self._sleep(delay)

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
        self._connack_max_packet = None
        self._lost = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.max_inflight_messages_set(self.cfg.mqtt.inflight + 2)
        host = self.cfg.mqtt.host
        assert host is not None  # _run does not connect without one
        try:
            if self.cfg.mqtt.protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0
                client.connect(
                    host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive_s, clean_start=True, properties=props
                )
            else:
                client.connect(host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive_s)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(f"TLS handshake failed: {exc.reason or exc}") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if self.cfg.mqtt.tls:  # the TCP connection was made: it is the handshake that failed
                raise BrokerUnavailable(f"TLS handshake failed: {exc}") from None
            raise BrokerUnavailable(str(exc)) from None
        except (ConnectionRefusedError, TimeoutError, socket.gaierror) as exc:
            # nothing listens there, or nothing answers: probing again costs the broker nothing
            raise BrokerUnavailable(str(exc) or type(exc).__name__, answered=False) from None
        except OSError as exc:
            quiet = exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT)
            raise BrokerUnavailable(str(exc) or type(exc).__name__, answered=not quiet) from None
        except ValueError as exc:
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
            raise BrokerUnavailable(
                f"broker refused the connection: {mqtt.connack_string(reason)}"
                if isinstance(reason, int)
                else f"broker refused the connection: {reason}"
            )
        self.status.max_packet_bytes = self._connack_max_packet
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connack = 0 if not reason.is_failure else reason.value
        limit = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._connack_max_packet = int(limit) if limit else None

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._lost = True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.commands is None:
            return
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self.commands.submit(
                msg.topic, bytes(msg.payload), response or None, bytes(corr) if corr is not None else None
            )
        except Exception:  # the session must outlive any command
            log.exception("command on %s not handed over", msg.topic)

    def _send_replies(self, client: mqtt.Client) -> None:
        """Publish the replies waiting (QoS 1), ahead of the event backlog."""
        if not self._replies:
            return
        with self._replies_lock:
            replies, self._replies = self._replies, []
        for reply in replies:
            mid = self._check(client.publish(self.reply_topic, reply.payload, qos=1))
            self._reply_mids[mid] = reply.command_id
            if reply.response_topic and self.cfg.mqtt.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)
                if reply.correlation is not None:
                    props.CorrelationData = reply.correlation
                try:
                    self._check(client.publish(reply.response_topic, reply.payload, qos=1, properties=props))
                except ValueError as exc:  # a response topic paho refuses (wildcards): `reply` still has it
                    log.warning("reply to %s not sent to its response topic: %s", reply.command_id[:64], exc)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        command_id = self._reply_mids.pop(mid, None)
        if command_id is not None:
            if self.commands is not None and not (
                reason is not None and getattr(reason, "is_failure", False)
            ):
                self.commands.reply_acked(command_id)
            return
        chunks = self._inflight.pop(mid, None)
        if chunks is None:
            return
        if mid == self._retrying:
            self._retrying = None
        if reason is not None and getattr(reason, "is_failure", False):
            # the broker refused this batch (e.g. 0x87 not authorised): never a success; the rows
            # stay, set aside so that the rest goes on, and are tried again later
            log.error("broker refused a batch on %s: %s", chunks[0].stream, reason)
            self.status.last_error = f"broker refused a batch: {reason}"
            self._set_aside(chunks, f"refused by the broker: {reason}")
            return
        self._strikes.pop(chunks[0].seq, None)
        for chunk in chunks:
            if self._parked.pop(chunk.seq, None) is not None:
                self._count_parked()
        if not self._healthy:
            self._became_healthy()
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

    def _serve(self, client: mqtt.Client, schedule: ReconnectSchedule | None = None) -> None:
        self.outbox.flush()  # acknowledged deletions are written before the backlog is read again
        self._cursor = 0
        self._inflight.clear()
        self._published.clear()
        self._retry_queue = []
        self._retrying = None
        self._schedule = schedule
        self._healthy = False
        self._connected_at = time.monotonic()
        if not self._parked_loaded:
            self._parked = read_parked(self.outbox.read_conn())
            self._parked_loaded = True
            self._count_parked()
        self._client = client
        now = self._clock()
        self.status.connected = True
        self.status.since = now
        self.status.last_error = None
        log.info("connected to broker %s:%s", self.cfg.mqtt.host, self.cfg.mqtt.port)
        online = orjson.dumps(
            {"online": True, "version": __version__, "since": self._fmt.format(int(now * 1000))}
        )
        self._check(client.publish(self.state_topic, online, qos=1, retain=True))
        self._reply_mids.clear()
        if self.commands is not None:
            result, _mid = client.subscribe([(topic, 1) for topic in self.command_topics])
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"subscribe failed: {mqtt.error_string(result)}")
            self.commands.connected()  # the channel hands back the replies not yet acknowledged
        next_metrics = time.monotonic() + min(5.0, self.cfg.mqtt.metrics_interval_s)
        try:
            while True:
                stopping = self._stop.is_set()
                if not stopping:
                    self._send_replies(client)
                    self._fill(client)
                elif not self._inflight or time.monotonic() > self._stop_deadline:
                    break
                if not self._healthy and time.monotonic() - self._connected_at >= self.HEALTHY_AFTER_S:
                    self._became_healthy()
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

    def _became_healthy(self) -> None:
        self._healthy = True
        if self._schedule is not None:
            self._schedule.reset()

    def _session_lost(self) -> None:
        """The connection ended: the batch oldest in flight gets a strike (unless we stopped)."""
        if self._stop.is_set() or not self._inflight:
            return
        oldest = next(iter(self._inflight.values()))
        strikes = self._strikes.get(oldest[0].seq, 0) + 1
        self._strikes[oldest[0].seq] = strikes
        if strikes >= self.STRIKES_TO_SET_ASIDE and oldest[0].seq not in self._parked:
            self._set_aside(oldest, f"the connection dropped with it in flight {strikes} times")

    def _set_aside(self, chunks: list[Chunk], reason: str) -> None:
        """Keep these chunks out of the backlog's way: recorded in the buffer, counted, announced."""
        new = [c for c in chunks if c.seq not in self._parked]
        for chunk in chunks:
            self._parked[chunk.seq] = chunk.n
            self._strikes.pop(chunk.seq, None)
        self._count_parked()
        if not new:
            return  # a retry refused again: still set aside, nothing new to announce
        self.status.set_aside_total += 1
        self.status.last_set_aside = reason
        events = sum(c.n for c in new)
        log.error(
            "set aside a batch of %d %s events (seq %d..): %s; kept in the buffer, retried later",
            events,
            new[0].stream,
            new[0].seq,
            reason,
        )
        now = self._clock()
        try:
            self.outbox.call(lambda conn: park(conn, [c.seq for c in new], reason, now), timeout=10)
        except Exception as exc:  # still set aside for this run; the buffer's fault is reported there
            log.error("could not record the set-aside batch in the buffer: %s", exc)
        if new[0].stream != "system":  # a refused system stream must not feed itself
            self.outbox.offer(
                Event(
                    "system.batch_set_aside",
                    {
                        "stream": new[0].stream,
                        "first_seq": new[0].seq,
                        "events": events,
                        "bytes": sum(len(c.body) for c in new),
                        "reason": reason,
                    },
                    "agent",
                )
            )

    def _count_parked(self) -> None:
        self.status.set_aside_chunks = len(self._parked)
        self.status.set_aside_events = sum(self._parked.values())

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
            free = min(window - len(self._inflight), READ_BATCHES)
            read = read_chunks(
                self.outbox.read_conn(),
                self._cursor,
                free * 64,
                max_bytes=free * self.cfg.mqtt.batch_max_bytes,
            )
            if not read:
                self._retry_parked(client)
                return
            fresh = [c for c in read if c.seq not in self._published and c.seq not in self._parked]
            for chunk in fresh:
                if not self._fits(chunk):
                    self._set_aside([chunk], self._too_big(chunk))
            batches = self._batches([c for c in fresh if c.seq not in self._parked])
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

    def _fits(self, chunk: Chunk) -> bool:
        limit = self._joined_limit(chunk.stream)
        return limit is None or len(chunk.body) <= limit

    def _too_big(self, chunk: Chunk) -> str:
        return (
            f"{len(chunk.body)} bytes cannot fit the broker's Maximum Packet Size "
            f"({self.status.max_packet_bytes} bytes)"
        )

    def _retry_parked(self, client: mqtt.Client) -> None:
        """The backlog is empty: try set-aside chunks again, one at a time, when a pass is due."""
        if not self._parked or self._retrying is not None:
            return
        if not self._retry_queue:
            if time.monotonic() < self._retry_due:
                return
            self._retry_due = time.monotonic() + self.PARKED_RETRY_S
            self._retry_queue = sorted(self._parked)
        while self._retry_queue:
            seq = self._retry_queue.pop(0)
            if seq not in self._parked or seq in self._published:
                continue
            found = read_chunks(self.outbox.read_conn(), seq - 1, 1)
            if not found or found[0].seq != seq:  # gone meanwhile (cap, erase)
                self._parked.pop(seq, None)
                self._count_parked()
                continue
            chunk = found[0]
            if not self._fits(chunk):
                continue  # still too big for this broker: stays set aside
            payload = batch_bytes(self._agent_json, chunk.body)
            mid = self._check(client.publish(self.up_prefix + chunk.stream, payload, qos=1))
            self._inflight[mid] = [chunk]
            self._published.add(seq)
            self._retrying = mid
            self.status.published_batches += 1
            self.status.inflight = len(self._inflight)
            return

    def _batches(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Group chunks per stream into batches within the size limits, in order of their oldest.

        `batch_max_bytes` is a soft limit (a chunk bigger than it goes alone); the broker's packet
        limit is a hard one (what can never fit was set aside before this)."""
        limit_events = self.cfg.mqtt.batch_size
        soft_bytes = self.cfg.mqtt.batch_max_bytes
        open_batches: dict[str, tuple[list[Chunk], list[int]]] = {}
        done: list[list[Chunk]] = []
        for chunk in chunks:
            current = open_batches.get(chunk.stream)
            if current is not None:
                batch, size = current
                hard = self._joined_limit(chunk.stream)
                joined = size[1] + 1 + len(chunk.body)  # with the comma between envelopes
                if (
                    size[0] + chunk.n > limit_events
                    or size[1] + len(chunk.body) > soft_bytes
                    or (hard is not None and joined > hard)
                ):
                    current = None
            if current is None:
                batch, size = [], [0, 0]
                open_batches[chunk.stream] = (batch, size)
                done.append(batch)
            batch.append(chunk)
            size[0] += chunk.n
            size[1] += len(chunk.body) + (1 if len(batch) > 1 else 0)
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
