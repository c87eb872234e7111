"""The agent's local web server (contract section 9): the event API of section 2.1, health, metrics, status.

`POST /v1/events` takes a JSON array or NDJSON of events from other software in the store and
answers 200 only after every event of the request is durably committed, in one outbox commit
(all or nothing). Parsing is orjson, validation a pydantic TypedDict run over the whole batch in
one call (its errors carry the event's index), so the per-event Python work is one conversion of
`ts` and one `Event`. Whether every event's `data` can be written (depth) and sent (size) is
told from one serialisation of the whole batch's data, so that an event too deep or too big to
ever be sent is refused here, with its index, rather than failing in the buffer's writer; the
writer serialises `data` again when it makes the envelope. Nothing is changed on the way: what JSON can say but the envelope could not carry exactly (integers beyond
64 bits) is refused, not rounded.

Every route sits behind `RequestGuard` (the Host names this server, no other origin's browser
pages); everything that changes state needs the token. The transport's own limits (header size,
header and body time, connections) are in `agent.httpserver`; the memory bodies hold here is
bounded by `BodyBudget`.

An `Idempotency-Key` is stored through the outbox's `Dedup`, in the same transaction as the
events: its stored result is the SHA-256 of the request body and the commit's id stems, from
which the same 200 body is made again (see `agent.buffer.idempotency`), so a retry is answered from the
buffer file, across restarts, and a different body under the same key is told apart.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, NotRequired

import orjson
from pydantic import ConfigDict, InstanceOf, StringConstraints, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from typing_extensions import TypedDict

from agent import __version__
from agent.buffer import Outbox
from agent.buffer.idempotency import NAMESPACE, lookup, parse_result, stored_result
from agent.config import AgentConfig, read_secret
from agent.core.envelope import INT_MAX, INT_MIN, MAX_DATA_DEPTH, EnvelopeEncoder, Event
from agent.core.timestamps import RFC3339_PATTERN, TimestampError, utc_ms_checked
from agent.sink import BufferUnavailable, Committed, Dedup
from agent.status import StatusReporter
from agent.uplink import Uplink

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "local_api"
# What a client is told to wait before retrying while the buffer is at its cap.
RETRY_AFTER_S = 5
MAX_KEY_LEN = 255
MAX_SOURCE_LEN = 200
MAX_NAME_LEN = 100
NDJSON = "application/x-ndjson"
JSON_TYPE = "application/json"
# Bodies of POST /v1/events held at once, all requests together, in units of `max_body_bytes`
# (32 MiB with the default 4 MiB): over it a request is refused (503) before its body is read.
BODIES_IN_FLIGHT = 8
# digits -> "0", everything else -> " ": a run of 19 digits, the shortest integer that can
# exceed 64 bits, is then a plain substring search (a regex over the body costs 10 times more)
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19
# what `source` may add to its length once serialised (escapes, UTF-8), quotes included
_SOURCE_SLACK = 5 * MAX_SOURCE_LEN + 4
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KEY_CHARS = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LEN}}}")


class ApiError(Exception):
    """An answer other than 200: status, JSON body, extra headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error"))
        self.status = status
        self.body = body
        self.headers = headers


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer serialised with orjson."""
    return Response(orjson.dumps(body), status, headers, media_type=JSON_TYPE)


# ---- request bodies -----------------------------------------------------------------------------

FIELDS = ("type", "data", "source", "ts")


class _Invalid(Exception):
    """Some event of the batch is bad: the slow path finds which, and why."""


class EventBatch:
    """Turns a request body into `Event`s, or raises ApiError (400, 413) saying what is wrong.

    `streams` are the streams the API admits; `max_events` the most one request may carry;
    `max_envelope` gives the largest envelope the uplink can ever send (it follows the broker's
    Maximum Packet Size, so it is asked per request). The pydantic model checks every event in
    one call; `_fit` serialises all the events' data at once to learn that none is too deep or
    too big (`_too_big` measures event by event only when the whole could be), and the happy
    path then converts `ts` and makes each `Event`, its `data` the dict as parsed (the writer
    serialises it). Any failure goes to `_errors`, which names every bad event and why.

    Why not keep each event's data serialised from here on, as orjson Fragments for the writer:
    measured, it cost the HTTP thread 0.7 us an event more than this (a Fragment alone 0.28 us),
    and orjson's bytes sit in a block of at least 4 KiB however short they are, so held until
    the commit they took 2 MB a request and +8 MB of peak RSS (tests/test_local_api_memory.py).

    Never changed silently: an integer beyond 64 bits would arrive upstream as a float (orjson
    reads it as one), so an event holding one is refused (400); `data` nested deeper than orjson
    can write is refused (400) instead of failing in the writer (500, retried forever).
    """

    def __init__(
        self, streams: list[str], max_events: int, max_envelope: Callable[[], int], encoder: EnvelopeEncoder
    ) -> None:
        self.streams = tuple(streams)
        self.max_events = max_events
        self.max_envelope = max_envelope
        alternatives = "|".join(re.escape(s) for s in self.streams)
        type_pattern = rf"^(?:{alternatives})\.[A-Za-z0-9_][A-Za-z0-9_.:\-]{{0,{MAX_NAME_LEN - 1}}}$"
        # an envelope's bytes beyond its data, type and source: id, seq (19 digits at most), ts,
        # the agent's identity and the punctuation
        probe = encoder.encode_many([Event("a.b", {}, "s")], 10**18, "0" * 32, "2026-01-01T00:00:00.000Z")[0]
        self._fixed = len(probe) - len(b'{}"a.b""s"')
        # the most a type and a source can add to an envelope, serialised, quotes included
        self._most_named = (
            max((len(orjson.dumps(s)) for s in self.streams), default=2)
            + 1
            + MAX_NAME_LEN
            + MAX_SOURCE_LEN
            + _SOURCE_SLACK
        )

        class EventIn(TypedDict):
            # extra keys are ignored here and refused by the length check in `decode`: pydantic's
            # extra="forbid" costs a third of the validation
            __pydantic_config__ = ConfigDict(strict=True, extra="ignore")  # type: ignore[misc]
            type: Annotated[str, StringConstraints(pattern=type_pattern)]
            data: InstanceOf[dict]  # type: ignore[type-arg]  # isinstance only: no copy of the payload
            source: NotRequired[Annotated[str, StringConstraints(min_length=1, max_length=MAX_SOURCE_LEN)]]
            ts: NotRequired[Annotated[str, StringConstraints(pattern=RFC3339_PATTERN)]]

        self._validate = TypeAdapter(list[EventIn]).validate_python

    def decode(self, body: bytes, ndjson: bool) -> list[Event]:
        """The request's events, in order; all valid or ApiError."""
        items = self._parse(body, ndjson)
        if len(items) > self.max_events:
            raise ApiError(
                413,
                {
                    "error": "too_many_events",
                    "reason": f"{len(items)} events; at most {self.max_events} a request",
                },
            )
        if _LONG_RUN in body.translate(_DIGITS):  # rare: look closer, event by event
            wide = _wide_integers(body, ndjson)
            if wide:
                raise ApiError(400, {"error": "invalid_events", "errors": self._errors(items, wide)})
        limit = self.max_envelope()
        try:
            valid = self._validate(items)
            # (index, envelope size) of events too big to send; TypeError: data nested too deep
            too_big = [] if self._fit(valid, limit) else self._too_big(valid, limit)
            events: list[Event] = []
            append = events.append
            for event, item in zip(valid, items, strict=True):
                if len(event) != len(item):
                    raise _Invalid
                ts = event.get("ts")
                append(
                    Event(
                        event["type"],
                        event["data"],
                        event.get("source", DEFAULT_SOURCE),
                        None if ts is None else utc_ms_checked(ts),
                    )
                )
        except (ValidationError, ValueError, TypeError, _Invalid):
            raise ApiError(400, {"error": "invalid_events", "errors": self._errors(items, {})}) from None
        if too_big:  # it could never be sent: the broker would drop the connection on it, forever
            raise ApiError(
                413,
                {
                    "error": "event_too_large",
                    "errors": [
                        {
                            "index": i,
                            "reason": f"its envelope would take {size} bytes; the broker takes at most {limit}",
                        }
                        for i, size in too_big
                    ],
                },
            )
        return events

    def _fit(self, valid: list[Any], limit: int) -> bool:
        """True when every event's data can be written and no envelope can exceed `limit`.

        One serialisation of all the data (0.1 us an event; one per event costs twice that, and
        its 4 KiB blocks): no event's data is longer than the whole, so the whole, the fixed
        part and the longest type and source that can pass validation bound every envelope.
        False sends the batch to `_too_big`, which is exact: also when the data is merely deep,
        as the list here adds a level to each.
        """
        try:
            whole = orjson.dumps([event["data"] for event in valid])
        except TypeError:
            return False
        return self._fixed + len(whole) + self._most_named <= limit

    def _too_big(self, valid: list[Any], limit: int) -> list[tuple[int, int]]:
        """(index, envelope size) of each event whose envelope would exceed `limit`.

        Raises TypeError (orjson's JSONEncodeError) for data nested deeper than can be written.
        """
        fixed = self._fixed
        dumps = orjson.dumps
        found: list[tuple[int, int]] = []
        for index, event in enumerate(valid):
            data = dumps(event["data"])
            source = event.get("source", DEFAULT_SOURCE)
            if fixed + len(data) + len(event["type"]) + len(source) + _SOURCE_SLACK > limit:
                exact = _envelope_size(fixed, data, event["type"], source)
                if exact > limit:
                    found.append((index, exact))
        return found

    def _parse(self, body: bytes, ndjson: bool) -> list[Any]:
        if not ndjson:
            try:
                items = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, {"error": "invalid_json", "reason": str(exc)}) from None
            if not isinstance(items, list):
                raise ApiError(
                    400, {"error": "invalid_json", "reason": "the body must be a JSON array of events"}
                )
            return items
        items = []
        loads = orjson.loads
        for number, line in enumerate(body.split(b"\n"), start=1):
            if not line.strip():
                continue  # blank lines (the final newline included) carry no event
            try:
                items.append(loads(line))
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, {"error": "invalid_json", "reason": f"line {number}: {exc}"}) from None
            if len(items) > self.max_events:  # no need to parse the rest to know it is too many
                raise ApiError(
                    413,
                    {
                        "error": "too_many_events",
                        "reason": f"more than {self.max_events} events; at most {self.max_events} a request",
                    },
                )
        return items

    def _errors(self, items: list[Any], found: dict[int, str]) -> list[dict[str, Any]]:
        """Every bad event's index and reason (the slow path, after the fast one refused)."""
        reasons: dict[int, list[str]] = {i: [r] for i, r in found.items()}
        try:
            self._validate(items)
        except ValidationError as exc:
            for error in exc.errors(include_url=False, include_context=False):
                loc = error["loc"]
                index = loc[0] if loc and isinstance(loc[0], int) else 0
                reasons.setdefault(index, []).append(self._reason(error["type"], loc[1:], items[index]))
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            for key in item:
                if key not in FIELDS:
                    reasons.setdefault(index, []).append(
                        f"unknown field {key[:40]!r} (an event has {', '.join(FIELDS)})"
                    )
            data = item.get("data")
            if isinstance(data, dict):
                try:
                    orjson.dumps(data)
                except TypeError:
                    reasons.setdefault(index, []).append(
                        f"data is nested too deep: at most {MAX_DATA_DEPTH} levels of objects and arrays"
                    )
            ts = item.get("ts")
            if index not in reasons and isinstance(ts, str):
                try:
                    utc_ms_checked(ts)
                except TimestampError:
                    reasons.setdefault(index, []).append(f"ts {ts[:40]!r} is not a valid date and time")
        return [{"index": i, "reason": "; ".join(dict.fromkeys(r))} for i, r in sorted(reasons.items())]

    def _reason(self, kind: str, loc: tuple[Any, ...], item: Any) -> str:
        if not loc:
            return "an event must be a JSON object"
        field = str(loc[0])
        if kind == "missing":
            return f"{field} is missing"
        if field == "data":
            return "data must be a JSON object"
        if kind == "string_type":
            return f"{field} must be a string"
        if field == "type":
            return self._type_reason(item["type"])
        if field == "source":
            return f"source must be 1 to {MAX_SOURCE_LEN} characters"
        if field == "ts":
            return (
                f"ts {item['ts'][:40]!r} is not RFC 3339 with an offset (e.g. 2026-11-23T09:15:02.125+01:00)"
            )
        return f"{field} is not valid"

    def _type_reason(self, value: str) -> str:
        stream, dot, name = value.partition(".")
        shown = value if len(value) <= 60 else value[:57] + "..."
        if not dot or not stream or not name:
            return f"type {shown!r} is not 'stream.name'"
        if stream not in self.streams:
            return f"stream {stream[:40]!r} is not accepted here (accepted: {', '.join(self.streams)})"
        return (
            f"type {shown!r}: the name after the stream must be 1 to {MAX_NAME_LEN} characters "
            "of A-Z a-z 0-9 _ . : -"
        )


def _envelope_size(fixed: int, data: bytes, event_type: str, source: str) -> int:
    return fixed + len(data) + len(orjson.dumps(event_type)) + len(orjson.dumps(source))


def _elements(body: bytes, ndjson: bool) -> Iterator[tuple[int, Any]]:
    """Each event of a body (already known to be valid JSON) parsed by the stdlib, integers exact."""
    decoder = json.JSONDecoder()
    if ndjson:
        index = 0
        for line in body.split(b"\n"):
            if line.strip():
                yield index, decoder.decode(line.decode())
                index += 1
        return
    text = body.decode()
    space = " \t\n\r"
    pos = len(text) - len(text.lstrip(space)) + 1  # past the "["
    index = 0
    while True:
        while text[pos] in space:
            pos += 1
        if text[pos] == "]":
            return
        value, pos = decoder.raw_decode(text, pos)
        yield index, value
        index += 1
        while text[pos] in space:
            pos += 1
        if text[pos] == ",":
            pos += 1


def _wide_integers(body: bytes, ndjson: bool) -> dict[int, str]:
    """Index -> reason for each event holding an integer that 64 bits cannot carry."""
    found: dict[int, str] = {}
    try:
        for index, value in _elements(body, ndjson):
            stack = [value]
            while stack:
                v = stack.pop()
                if type(v) is int:
                    if not INT_MIN <= v <= INT_MAX:
                        digits = str(v)
                        found[index] = (
                            f"the integer {digits[:24]}{'...' if len(digits) > 24 else ''} does not fit "
                            "in 64 bits and would lose digits: send it as a string"
                        )
                        break
                elif type(v) is dict:
                    stack.extend(v.values())
                elif type(v) is list:
                    stack.extend(v)
    except RecursionError:  # an event nested ~1,000 deep: refused for its depth all the same
        pass
    except (ValueError, IndexError):  # what orjson read and the stdlib does not: nothing more to find
        pass
    return found


# ---- the app ------------------------------------------------------------------------------------


class BodyBudget:
    """Bytes of request bodies the event API holds at once, all requests together.

    A request takes its declared Content-Length before its body is read, or, chunked, each
    chunk as it arrives; it gives them back when it is answered. Without it, open bodies of
    many connections held 1 GB. The event loop is the only user: no lock.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.total:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class EventApi:
    """`POST /v1/events`: auth, limits, idempotency, one commit per request."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox, max_envelope: Callable[[], int]) -> None:
        api = cfg.local_api
        self.outbox = outbox
        self.max_body = api.max_body_bytes
        self.budget = BodyBudget(BODIES_IN_FLIGHT * api.max_body_bytes)
        encoder = EnvelopeEncoder(cfg.agent.tenant, cfg.agent.store, cfg.agent.id)
        self.batch = EventBatch(api.streams, api.max_events, max_envelope, encoder)
        token = read_secret(api.token_file)
        if token is None:
            log.warning(
                "local API: no [local_api] token_file is set, so POST /v1/events and /v1/drain refuse "
                "every request (401) until one is"
            )
            self._expected: bytes | None = None
        elif not token.strip():
            log.warning(
                "local API: the token file %s is empty, so POST /v1/events and /v1/drain refuse every "
                "request (401)",
                api.token_file,
            )
            self._expected = None
        else:
            self._expected = token.strip().encode()
        self._inflight: set[str] = set()

    def authorized(self, request: Request) -> bool:
        """True for `Authorization: Bearer <token>` with the configured token (constant-time compare)."""
        if self._expected is None:
            return False
        header = request.headers.get("authorization")
        if header is None:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._expected)

    def require_token(self, request: Request) -> None:
        """ApiError 401 unless the request carries the API token."""
        if not self.authorized(request):
            raise ApiError(
                401,
                {"error": "unauthorized", "reason": "a valid 'Authorization: Bearer <token>' is needed"},
                {"WWW-Authenticate": 'Bearer realm="store-agent"'},
            )

    async def handle(self, request: Request) -> Response:
        """Answer one request; every refusal is a JSON body with an `error` code."""
        held = [0]
        try:
            return await self._handle(request, held)
        except ApiError as exc:
            return json_response(exc.status, exc.body, exc.headers)
        finally:
            self.budget.give(held[0])

    async def _handle(self, request: Request, held: list[int]) -> Response:
        self.require_token(request)
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in (JSON_TYPE, NDJSON):
            # also what keeps a browser's cross-origin "simple" POST (text/plain, forms) out
            raise ApiError(
                415,
                {
                    "error": "unsupported_media_type",
                    "reason": f"Content-Type must be {JSON_TYPE} or {NDJSON}",
                },
            )
        key = request.headers.get("idempotency-key")
        if key is not None and not _KEY_CHARS.fullmatch(key):
            raise ApiError(
                400,
                {
                    "error": "invalid_idempotency_key",
                    "reason": f"1 to {MAX_KEY_LEN} visible ASCII characters",
                },
            )
        body = await self._read_body(request, held)
        ndjson = media == NDJSON
        if key is None:
            events = self.batch.decode(body, ndjson)
            del body
            committed = await self._commit(events, None)
            return Response(_answer(committed), 200, media_type=JSON_TYPE)
        if key in self._inflight:
            raise ApiError(
                409,
                {
                    "error": "request_in_progress",
                    "reason": "a request with this Idempotency-Key is still being committed",
                },
            )
        self._inflight.add(key)
        try:
            digest = hashlib.sha256(body).hexdigest().encode()
            stored = lookup(self.outbox.read_conn(), key)
            if stored is not None:
                return _replay(stored, digest)
            events = self.batch.decode(body, ndjson)
            del body
            committed = await self._commit(events, Dedup(NAMESPACE, key, stored_result(digest)))
            if committed.duplicate:  # cannot happen while the key is in flight here; kept safe all the same
                return _replay(committed.result, digest)
            return Response(_answer(committed), 200, media_type=JSON_TYPE)
        finally:
            self._inflight.discard(key)

    async def _read_body(self, request: Request, held: list[int]) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_body:
                raise self._too_large()
            self._take(int(declared), held)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:  # stop reading: the rest is never buffered
                    raise self._too_large()
                if size > held[0]:  # chunked (or longer than declared): take as it comes
                    self._take(size - held[0], held)
                chunks.append(chunk)
        except ClientDisconnect:  # nobody is left to answer; nothing was committed
            raise ApiError(400, {"error": "incomplete_body"}) from None
        return b"".join(chunks)

    def _take(self, n: int, held: list[int]) -> None:
        if not self.budget.take(n):
            raise ApiError(
                503,
                {
                    "error": "busy",
                    "reason": "too many request bodies are being received at once; retry shortly",
                },
                {"Retry-After": "1", "Connection": "close"},
            )
        held[0] += n

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            {"error": "body_too_large", "reason": f"at most {self.max_body} bytes a request"},
            {"Connection": "close"},
        )

    async def _commit(self, events: list[Event], dedup: Dedup | None) -> Committed:
        try:
            return await self.outbox.commit(events, dedup=dedup)
        except BufferUnavailable as exc:
            raise ApiError(
                503,
                {"error": exc.code, "reason": _UNAVAILABLE.get(exc.code, str(exc))},
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None


_UNAVAILABLE = {
    "buffer_full": "the buffer is at its disk cap ([buffer] max_bytes); retry later",
    "disk_full": "the disk holding the buffer is full; retry later",
    "buffer_io_error": "the buffer file cannot be written (disk I/O error or read-only file system); retry later",
}


# The 4-hex-digit event numbers of a stem (see `Committed.stems`), made once: a request's ids are
# then one C-level join per stem instead of a string format per id.
_NUMBERS = [b"%04x" % i for i in range(5000)]


def _answer(committed: Committed) -> bytes:
    """The 200 body: `{"accepted": n, "ids": [...]}`, ids in the order of the request's events."""
    parts = []
    for stem, n in committed.stems:
        quoted = b'"' + stem.encode()
        numbers = _NUMBERS[:n] if n <= len(_NUMBERS) else [b"%04x" % i for i in range(n)]
        parts.append(quoted + (b'",' + quoted).join(numbers) + b'"')
    return b'{"accepted":%d,"ids":[%s]}' % (committed.count, b",".join(parts))


def _replay(stored: bytes, digest: bytes) -> Response:
    """The first answer again for a repeated key, or 422 if the body is not the first one's."""
    first_digest, committed = parse_result(stored)
    if first_digest != digest:
        raise ApiError(
            422,
            {
                "error": "idempotency_key_reused",
                "reason": "this Idempotency-Key was used for a different request body",
            },
        )
    return Response(_answer(committed), 200, {"Idempotent-Replayed": "true"}, media_type=JSON_TYPE)


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The `Host` header values a request may carry: this server's own names, with its port.

    Loopback names and the configured host always; when listening on every interface
    (0.0.0.0, ::), also any IP literal and this machine's names, as a LAN client types them. A
    DNS name that merely resolves here (DNS rebinding: a web page's own name pointed at
    127.0.0.1) is not among them.
    """
    names = {"127.0.0.1", "localhost", "[::1]", _bracketed(host)}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname(), socket.getfqdn()}
    hosts = {f"{n.lower()}:{port}" for n in names if n}
    if port == 80:
        hosts |= {n.lower() for n in names if n}
    return frozenset(hosts)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class RequestGuard:
    """ASGI middleware in front of every route: the Host is ours and the request is not cross-origin.

    - `Host` must name this server (see `allowed_hosts`): otherwise 421. This is what stops DNS
      rebinding from reading /v1/status or /metrics through a browser.
    - A browser's cross-origin request carries `Origin` (another origin, or `null`) or
      `Sec-Fetch-Site: cross-site`/`same-site`: 403. The server sends no CORS headers, so no
      browser page but its own may read or write it; `Content-Type` on POST /v1/events (415) shuts
      out the "simple" cross-origin POSTs that need no preflight.
    """

    def __init__(self, app: Any, hosts: frozenset[str], any_ip_port: int | None) -> None:
        self.app = app
        self.hosts = hosts
        self.any_ip_port = any_ip_port  # listening on every interface: any IP literal with this port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["headers"])
            if refusal is not None:
                response = json_response(refusal[0], refusal[1], {"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def host_ok(self, host: str) -> bool:
        host = host.lower()
        if host in self.hosts:
            return True
        if self.any_ip_port is None:
            return False
        name, sep, port = host.rpartition(":")
        if not sep or port != str(self.any_ip_port):
            return False
        try:
            ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        except ValueError:
            return False
        return True

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str]] | None:
        host = origin = fetch_site = None
        for name, value in headers:
            if name == b"host":
                if host is not None:  # two Host headers: which one a proxy believed is anyone's guess
                    return 400, {"error": "bad_host", "reason": "more than one Host header"}
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                fetch_site = value.decode("latin-1").lower()
        if host is None or not self.host_ok(host):
            return 421, {
                "error": "misdirected_request",
                "reason": "the Host header does not name this server (use 127.0.0.1:PORT or localhost:PORT)",
            }
        if origin is not None and not (
            origin.lower().startswith("http://") and origin[7:].lower() == host.lower()
        ):
            return 403, {
                "error": "cross_origin",
                "reason": "requests from web pages of other origins are refused",
            }
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return 403, {
                "error": "cross_origin",
                "reason": "requests from web pages of other origins are refused",
            }
        return None


def make_app(cfg: AgentConfig, outbox: Outbox, reporter: StatusReporter, uplink: Uplink) -> Any:
    """The local web server's app: `/v1/events`, `/healthz`, `/metrics`, `/v1/status`, `/v1/drain`.

    Raises ConfigError when `[local_api] token_file` is set but cannot be read.
    """
    events = EventApi(cfg, outbox, lambda: uplink.max_event_bytes)

    async def healthz(request: Request) -> Response:
        problems = reporter.problems()
        up = uplink.status
        body = {
            "ok": not problems,
            "version": __version__,
            "buffer": {
                "open": outbox.alive,
                "writable": outbox.alive and not outbox.failure,
                "failure": outbox.failure,
                "events": outbox.count,
                "bytes": outbox.bytes,
            },
            "mqtt": {"configured": up.configured, "connected": up.connected, "last_error": up.last_error},
            "threads": {
                "buffer_writer": outbox.alive,
                "uplink": uplink.alive,
                **{name: alive() for name, alive in reporter.threads.items()},
            },
            "problems": problems,
        }
        return json_response(503 if problems else 200, body)

    async def metrics(request: Request) -> Response:
        return Response(reporter.prometheus(), 200, media_type=PROMETHEUS_TYPE)

    async def status(request: Request) -> Response:
        return json_response(200, reporter.status())

    async def drain(request: Request) -> Response:
        try:
            events.require_token(request)  # it changes what the agent does: the same token as events
        except ApiError as exc:
            return json_response(exc.status, exc.body, exc.headers)
        uplink.attempt_now()
        return json_response(200, reporter.status())

    app = Starlette(
        routes=[
            Route("/v1/events", events.handle, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/v1/drain", drain, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    api = cfg.local_api
    wildcard = api.host in ("0.0.0.0", "::", "")
    return RequestGuard(app, allowed_hosts(api.host, api.port), api.port if wildcard else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed"}
    return json_response(exc.status_code, {"error": names.get(exc.status_code, "http_error")}, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # one log line (logsetup keeps it to the exception's type and text); nothing of it in the answer
    log.error("local API: %s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return json_response(500, {"error": "internal_error"})
