"""Pure parsing of one uplink message into rows to land and rejects to keep (contract sections 3 and 10).

No I/O here: the input is a topic and its payload bytes, the output plain tuples the database
module copies into PostgreSQL. What is checked, and why:

- A payload that is not a batch (not UTF-8 JSON, not an object, no `events` list, or an `agent`
  that differs from the topic's) is rejected whole, its bytes kept as they came.
- Each envelope is checked on its own; a bad one is rejected alone, as the exact bytes it had
  inside the payload (`element_spans` finds them), and the rest of its batch lands. Bad means:
  `id` not a UUID, `seq` not an integer in bigint range, `ts` not RFC 3339 with an offset,
  `type` not a non-empty string, `source` neither a string nor absent, `data` absent, a NUL
  character anywhere PostgreSQL text or jsonb cannot hold one, or a tenant, store or agent that
  differs from the topic's. Everything that passes here is guaranteed to be accepted by
  PostgreSQL's COPY, so one bad envelope can never poison a whole transaction.
- Rows come out as COPY text lines (tab-separated, backslash-escaped) because building them in
  Python once is the cheapest way to move 50,000 events a second; `ts` is written normalised
  (`datetime.isoformat`) and its UTC day is returned for the partition it lands in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import orjson

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# RFC 3339 date-time; the offset is mandatory (a naive time is not RFC 3339)
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_BIGINT_MAX = (1 << 63) - 1
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class TopicError(ValueError):
    """A topic that is not `{prefix}/{tenant}/{store}/{agent}/up/...`."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Who published, read from the topic."""

    tenant: str
    store: str
    agent: str
    copy_text: str = ""  # the three as COPY text columns, made once per message

    @classmethod
    def of(cls, tenant: str, store: str, agent: str) -> Origin:
        return cls(tenant, store, agent, f"{_esc(tenant)}\t{_esc(store)}\t{_esc(agent)}")


@dataclass(frozen=True, slots=True)
class Reject:
    """Something that cannot land, kept as it came: the whole payload or one envelope's bytes."""

    topic: str
    payload: bytes
    reason: str
    received_at: str


@dataclass(slots=True)
class Parsed:
    """One message's outcome: COPY lines keyed by event id (first copy wins), their days, rejects."""

    rows: dict[str, bytes] = field(default_factory=dict)
    days: set[date] = field(default_factory=set)
    rejects: list[Reject] = field(default_factory=list)


def subscription(group: str, prefix: str) -> str:
    """The shared subscription every instance of a group makes (contract section 10)."""
    return f"$share/{group}/{prefix}/+/+/+/up/#"


def parse_topic(topic: str, prefix: str) -> Origin:
    """`{prefix}/{tenant}/{store}/{agent}/up/{stream}` → its tenant, store and agent."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise TopicError(f"topic {topic!r} is not under {prefix!r}")
    parts = topic[len(head) :].split("/")
    if len(parts) < 4 or parts[3] != "up" or not all(parts[:3]):
        raise TopicError(f"topic {topic!r} is not {prefix}/tenant/store/agent/up/stream")
    return Origin.of(parts[0], parts[1], parts[2])


def parse_message(topic: str, payload: bytes, prefix: str, received_at: str, out: Parsed) -> None:
    """Add one message's rows and rejects to `out`. `received_at` is already COPY text.

    Within `out`, an id seen before is skipped: the first copy (and its received_at) wins,
    as it does in the database.
    """
    try:
        origin = parse_topic(topic, prefix)
    except TopicError as exc:
        out.rejects.append(Reject(topic, payload, str(exc), received_at))
        return
    try:
        batch = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        out.rejects.append(Reject(topic, payload, f"not a batch: not JSON ({exc})", received_at))
        return
    if not isinstance(batch, dict):
        out.rejects.append(Reject(topic, payload, "not a batch: not a JSON object", received_at))
        return
    events = batch.get("events")
    if not isinstance(events, list):
        out.rejects.append(Reject(topic, payload, "not a batch: `events` is not a list", received_at))
        return
    agent = batch.get("agent", origin.agent)
    if agent != origin.agent:
        out.rejects.append(
            Reject(topic, payload, "not a batch: its `agent` differs from the topic's", received_at)
        )
        return
    spans: list[tuple[int, int]] | None = None
    rows = out.rows
    for index, event in enumerate(events):
        try:
            event_id, line, day = envelope_row(event, origin, received_at)
        except ValueError as exc:
            if spans is None:
                spans = element_spans(payload)
            start, end = spans[index] if index < len(spans) else (0, len(payload))
            out.rejects.append(Reject(topic, payload[start:end], f"events[{index}]: {exc}", received_at))
            continue
        if event_id not in rows:
            rows[event_id] = line
            out.days.add(day)


def envelope_row(event: object, origin: Origin, received_at: str) -> tuple[str, bytes, date]:
    """One envelope → (id, COPY line, UTC day of ts); ValueError naming what is wrong."""
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or _UUID.fullmatch(event_id) is None:
        raise ValueError("id is not a UUID")
    seq = event.get("seq")
    if type(seq) is not int or not 0 <= seq <= _BIGINT_MAX:
        raise ValueError("seq is not an integer")
    ts_text = event.get("ts")
    if not isinstance(ts_text, str):
        raise ValueError("ts is not RFC 3339 with an offset")
    ts, day = parse_ts(ts_text)
    if event.get("tenant") != origin.tenant:
        raise ValueError("tenant differs from the topic's")
    if event.get("store") != origin.store:
        raise ValueError("store differs from the topic's")
    if event.get("agent") != origin.agent:
        raise ValueError("agent differs from the topic's")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind or "\x00" in kind:
        raise ValueError("type is not a non-empty string")
    source = event.get("source")
    if source is None:
        source_text = "\\N"
    elif isinstance(source, str) and "\x00" not in source:
        source_text = _esc(source)
    else:
        raise ValueError("source is not a string")
    if "data" not in event:
        raise ValueError("data is missing")
    data = orjson.dumps(event["data"])
    if b"\\u0000" in data:  # jsonb cannot hold NUL
        raise ValueError("data holds a NUL character")
    event_id = event_id.lower()
    # COPY text: in the JSON only backslashes need escaping (orjson escapes control characters)
    head = f"{event_id}\t{origin.copy_text}\t{seq}\t{_esc(kind)}\t{source_text}\t{ts}\t".encode()
    return event_id, head + data.replace(b"\\", b"\\\\") + b"\t" + received_at.encode() + b"\n", day


def parse_ts(text: str) -> tuple[str, date]:
    """RFC 3339 with an offset → (normalised text PostgreSQL reads, the UTC day)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("ts is not RFC 3339 with an offset")
    frac = match.group(7)
    offset = match.group(8)
    if (frac is None or len(frac) <= 7) and text[10] == "T" and offset != "z":
        normal = text  # the usual form (`2026-11-23T08:15:02.125Z`): as it is
    else:
        # microseconds are PostgreSQL's precision (and Python's limit); `t`, `z`, ` ` spelled out
        normal = f"{text[:10]}T{text[11:19]}{(frac or '')[:7]}{'Z' if offset in ('Z', 'z') else offset}"
    try:
        ts = datetime.fromisoformat(normal)
    except ValueError:
        raise ValueError("ts is not RFC 3339 with an offset (no such date or time)") from None
    day = ts.date() if offset in ("Z", "z", "+00:00", "-00:00") else ts.astimezone(UTC).date()
    return normal, day


_ESCAPED: dict[str, str] = {}


def _esc(text: str) -> str:
    """`text` escaped for COPY's text format; types and sources repeat, so results are kept."""
    escaped = _ESCAPED.get(text)
    if escaped is None:
        escaped = text.translate(_COPY_ESCAPES)
        if len(_ESCAPED) < 10_000:
            _ESCAPED[text] = escaped
    return escaped


def element_spans(payload: bytes) -> list[tuple[int, int]]:
    """Byte spans of the elements of the top-level object's `events` array, in order.

    Only called on the reject path, so it favours plainness over speed. The payload is valid
    JSON (orjson parsed it); with a duplicate `events` key, the last one counts, as in orjson.
    """
    spans: list[tuple[int, int]] = []
    found: list[tuple[int, int]] = []
    depth = 0
    i = 0
    n = len(payload)
    key: bytes | None = None  # the last string read at depth 1, while it may still be a key
    in_events = False
    element_start: int | None = None
    while i < n:
        c = payload[i]
        if c == 0x22:  # a string: skip it whole
            j = i + 1
            while payload[j] != 0x22:
                j += 2 if payload[j] == 0x5C else 1
            if depth == 1:
                key = payload[i : j + 1]
            elif in_events and depth == 2 and element_start is None:
                element_start = i
            i = j + 1
            continue
        if c in b" \t\r\n":
            i += 1
            continue
        if c == 0x3A:  # ':' at depth 1: the value of `key` follows
            if depth == 1 and key is not None:
                in_events = orjson.loads(key) == "events"
                if in_events:
                    spans = []
            i += 1
            continue
        if in_events and depth == 2 and element_start is None and c not in b",]":
            element_start = i
        if c in b"[{":
            depth += 1
        elif c in b"]}":
            if in_events and depth == 2 and element_start is not None:
                spans.append((element_start, _rstrip(payload, element_start, i)))
                element_start = None
            depth -= 1
            if depth == 1 and in_events:
                in_events = False
                found = spans
        elif c == 0x2C and in_events and depth == 2 and element_start is not None:
            spans.append((element_start, _rstrip(payload, element_start, i)))
            element_start = None
        if depth == 1 and c == 0x2C:
            key = None
        i += 1
    return found


def _rstrip(payload: bytes, start: int, end: int) -> int:
    while end > start and payload[end - 1] in b" \t\r\n":
        end -= 1
    return end
