"""Events and the upstream envelope (contract section 2): ids, timestamps, streams, priorities.

An event is stored once, at commit, as the JSON of its envelope without `seq` and without the
agent's identity (`tenant`, `store`, `agent`); both are spliced in when a batch is sent, so a
buffered event costs only what is particular to it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from agent.core import timestamps
from agent.core.errors import at_byte

# Streams the cap may drop (oldest first) to make room; everything else is refused instead.
LOW_PRIORITY_STREAMS = frozenset({"traffic", "metrics", "telemetry"})
# Never dropped: the agent stops acknowledging the device instead (contract section 4.1).
CRITICAL_STREAMS = frozenset({"pos", "scan", "command", "pickup"})

# Streams the drivers and the agent itself publish (contract section 2): never admitted from the
# local API, or HTTP clients could skip the POS dedup or forge the agent's own events.
AGENT_STREAMS = frozenset(
    {
        "pos",
        "scan",
        "presence",
        "traffic",
        "shelf",
        "label",
        "screen",
        "pickup",
        "command",
        "kpi",
        "system",
        "metrics",
        "telemetry",
    }
)

PRIORITY_LOW = 0
PRIORITY_NORMAL = 1
PRIORITY_CRITICAL = 2


class EnvelopeError(ValueError):
    """An event that cannot become an envelope (bad type, bad timestamp, data not an object)."""


# orjson serialises at most 254 levels of nesting; `data` deeper than that cannot be stored.
MAX_DATA_DEPTH = 254
# Integers JSON carries exactly through orjson (and most consumers): int64 and uint64.
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1
# 19 digits reach past int64's minimum; anything shorter is in range for sure.
_LONG_INTEGER = re.compile(r"\d{19,}")


def json_problem(text: str, parsed: Any) -> str | None:
    """Why JSON `text`, parsed by orjson into `parsed`, cannot be stored exactly; None if it can.

    Two things orjson does not refuse at parse time: nesting deeper than it can serialise again
    (the event could never be committed, so nothing would answer for it), and integers beyond 64
    bits, which it reads as floats (the digits would change silently).
    """
    try:
        orjson.dumps(parsed)
    except orjson.JSONEncodeError:
        return f"JSON nests deeper than {MAX_DATA_DEPTH} levels"
    if _LONG_INTEGER.search(text) is None:
        return None
    found: list[str] = []

    def parse_int(literal: str) -> int:
        value = int(literal)
        if not INT_MIN <= value <= INT_MAX and not found:
            found.append(literal)
        return value

    json.loads(text, parse_int=parse_int)  # already valid JSON: only the integers are looked at
    if not found:
        return None
    offset = len(text[: text.find(found[0])].encode("utf-8"))
    shown = found[0] if len(found[0]) <= 40 else found[0][:37] + "..."
    return f"integer {shown} {at_byte(offset)} is beyond 64 bits and would lose digits (send it as a string)"


def stream_of(event_type: str) -> str:
    """The stream of an event type: the part before the first dot."""
    stream, dot, name = event_type.partition(".")
    if not dot or not stream or not name:
        raise EnvelopeError(f"event type {event_type!r} is not 'stream.name'")
    return stream


def priority_of(stream: str) -> int:
    """How hard the buffer fights to keep a stream's events when its cap is reached."""
    if stream in CRITICAL_STREAMS:
        return PRIORITY_CRITICAL
    if stream in LOW_PRIORITY_STREAMS:
        return PRIORITY_LOW
    return PRIORITY_NORMAL


class Event:
    """One thing that happened in the store, before it is committed.

    `ts` is RFC 3339 UTC with milliseconds (see `utc_ms`); None means "when it is committed".
    `data` must serialise to a JSON object.
    """

    __slots__ = ("type", "data", "source", "ts", "stream")

    def __init__(self, type: str, data: Mapping[str, Any], source: str, ts: str | None = None) -> None:
        self.type = type
        self.data = data
        self.source = source
        self.ts = ts
        self.stream = stream_of(type)

    def __repr__(self) -> str:
        return f"Event({self.type!r}, {self.data!r}, {self.source!r}, {self.ts!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.type, self.data, self.source, self.ts) == (
            other.type,
            other.data,
            other.source,
            other.ts,
        )


class Uuid7:
    """UUIDv7 text ids (RFC 9562), time-ordered and unique, made a commit at a time.

    A commit's ids share a stem: the millisecond, a 12-bit `rand_a` counter seeded at random each
    millisecond and stepped for every stem (RFC 9562 method 1, so stems made in the same
    millisecond sort in the order they were made) and 46 random bits; the last 16 bits of
    `rand_b` number the commit's events (method 2, a monotonic counter). One commit takes at most
    65,536 ids from a stem; more take further stems.
    """

    __slots__ = ("_last_ms", "_counter", "_prefix", "_bits")

    PER_STEM = 1 << 16

    def __init__(self, rng: random.Random | None = None) -> None:
        self._last_ms = -1
        self._counter = 0
        self._prefix = ""
        self._bits = (rng or random.Random()).getrandbits

    def stem(self, now_ms: int) -> str:
        """32 characters of an id; append `f"{i:04x}"` for the commit's i-th event."""
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._counter = self._bits(11)
            h = f"{now_ms & 0xFFFFFFFFFFFF:012x}"
            self._prefix = f"{h[:8]}-{h[8:]}-7"
        else:
            self._counter += 1
            if self._counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                return self.stem(self._last_ms + 1)
        r = f"{self._bits(46) | 0x800000000000:012x}"
        return f"{self._prefix}{self._counter:03x}-{r[:4]}-{r[4:]}"

    def make(self, now_ms: int) -> str:
        """One id on its own."""
        return self.stem(now_ms) + f"{self._bits(16):04x}"


class UtcFormatter:
    """Formats Unix milliseconds as `2026-11-23T08:15:02.125Z`, caching the seconds part."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def format(self, epoch_ms: int) -> str:
        sec, ms = divmod(epoch_ms, 1000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{ms:03d}Z"


def parse_ts(text: str) -> datetime:
    """Parse RFC 3339 with an explicit offset (`Z` or `±hh:mm`); anything else is an error."""
    try:
        return timestamps.parse(text)
    except timestamps.TimestampError:
        raise EnvelopeError(f"ts {text!r} is not RFC 3339 with an offset") from None


def utc_ms(text: str) -> str:
    """An RFC 3339 timestamp with any offset, as UTC with milliseconds (the envelope's `ts`)."""
    try:
        return timestamps.utc_ms(text)
    except timestamps.TimestampError:
        raise EnvelopeError(f"ts {text!r} is not RFC 3339 with an offset") from None


class EnvelopeEncoder:
    """Encodes events as full envelope JSON (contract section 2), as cheaply as Python allows.

    Stored envelopes are complete, the agent's identity included, so a batch is sent as the
    stored bytes joined by commas: sending does no per-event work.
    """

    __slots__ = ("_identity", "_names")

    def __init__(self, tenant: str, store: str, agent: str) -> None:
        self._identity = orjson.dumps({"tenant": tenant, "store": store, "agent": agent})[1:-1]
        self._names: dict[str, bytes] = {}

    def _name(self, text: str) -> bytes:
        encoded = self._names.get(text)
        if encoded is None:
            encoded = orjson.dumps(text)
            if len(self._names) < 4096:
                self._names[text] = encoded
        return encoded

    def encode_many(self, events: Sequence[Event], first_seq: int, stem: str, now_ts: str) -> list[bytes]:
        """Envelopes for a commit's events, numbered from `first_seq`, ids `stem` + 4 hex digits.

        `id` comes first so that its time can be read without parsing (see `id_time`).
        """
        stem_b = stem.encode()
        now_b = now_ts.encode()
        out: list[bytes] = []
        append = out.append
        dumps = orjson.dumps
        last_type = last_source = None
        rest = b""
        i = 0
        try:
            for event in events:
                if event.type is not last_type or event.source is not last_source:
                    last_type, last_source = event.type, event.source
                    rest = b'"type":%s,"source":%s,%s,"data":' % (
                        self._name(event.type),
                        self._name(event.source),
                        self._identity,
                    )
                data = dumps(event.data)
                if data[:1] != b"{":
                    raise EnvelopeError(f"data of {event.type} is not a JSON object")
                ts = event.ts.encode() if event.ts else now_b
                append(
                    b'{"id":"%s%04x","seq":%d,"ts":"%s",%s%s}' % (stem_b, i, first_seq + i, ts, rest, data)
                )
                i += 1
        except TypeError as exc:
            raise EnvelopeError(f"event {i} is not JSON: {exc}") from None
        return out


def id_time(envelope: bytes) -> float:
    """Commit time of a stored envelope, read from its UUIDv7 id (the first 48 bits are Unix ms)."""
    start = envelope.index(b'"id":"') + 6
    return int(envelope[start : start + 13].replace(b"-", b""), 16) / 1000.0


def batch_bytes(agent_json: bytes, joined_envelopes: bytes) -> bytes:
    """An `up/{stream}` payload, `{"agent": "…", "events": [envelope, …]}`, from joined envelopes."""
    return b'{"agent":%s,"events":[%s]}' % (agent_json, joined_envelopes)
