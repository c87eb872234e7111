"""The agent's local web server (contract section 9): the event API of section 2.1, health, metrics, status.

`POST /v1/events` takes a JSON array or NDJSON of events from other software in the store and
answers 200 only after every event of the request is durably committed, in one outbox commit
(all or nothing). Parsing is orjson, validation a pydantic TypedDict run over the whole batch in
one call (its errors carry the event's index), so the per-event Python work is one conversion of
`ts` and one `Event`.

An `Idempotency-Key` is stored through the outbox's `Dedup`, in the same transaction as the
events: its stored result is the SHA-256 of the request body and the commit's id stems, from
which the same 200 body is made again (see `agent.buffer.idempotency`), so a retry is answered from the
buffer file, across restarts, and a different body under the same key is told apart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
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
from agent.core.envelope import Event
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


# ---- timestamps -------------------------------------------------------------------------------

# RFC 3339 `date-time` (section 5.6, with `t`/`z` and the space for `T` that its note allows).
# Field ranges are checked here; whether the day exists in its month is checked on conversion.
RFC3339_PATTERN = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt ](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
_rfc3339 = re.compile(RFC3339_PATTERN)
# "YYYY-MM-DDTHH:MM" + offset -> that minute in UTC. Offsets are whole minutes, so seconds never
# change the conversion: events of the same minute share an entry and convert by slicing.
_minutes: dict[str, str] = {}
_MINUTES_MAX = 8192


def _utc_minute(head: str, offset: str) -> str:
    if offset == "Z":
        tz = UTC
    else:
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        tz = timezone(-delta if offset[0] == "-" else delta)
    try:
        local = datetime(int(head[0:4]), int(head[5:7]), int(head[8:10]), int(head[11:13]), int(head[14:16]),
                         tzinfo=tz)
        utc = local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError("not a valid date and time") from None
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}"


def utc_ms_checked(ts: str) -> str:
    """An RFC 3339 `ts` already matched by RFC3339_PATTERN, as UTC with milliseconds.

    Fractions beyond milliseconds are truncated. Raises ValueError for a day that does not exist
    (2026-02-30) or a result outside years 1-9999.
    """
    if ts[-1] in "Zz":
        key = ts[:16] + "Z"
        frac = ts[20:-1]
    else:
        key = ts[:16] + ts[-6:]
        frac = ts[20:-6]
    prefix = _minutes.get(key)
    if prefix is None:
        prefix = _utc_minute(key[:16], key[16:])
        if len(_minutes) >= _MINUTES_MAX:
            _minutes.clear()
        _minutes[key] = prefix
    if len(frac) == 3:
        if key[16:] == "Z" and ts[-1] == "Z" and key[:16] == prefix:
            return ts  # already the envelope's form
        return f"{prefix}:{ts[17:19]}.{frac}Z"
    return f"{prefix}:{ts[17:19]}.{(frac + '00')[:3] if frac else '000'}Z"


def rfc3339_utc_ms(text: str) -> str:
    """RFC 3339 with an offset -> the envelope's `ts`, UTC with milliseconds; ValueError otherwise."""
    if not isinstance(text, str) or not _rfc3339.match(text):
        raise ValueError("not RFC 3339 with an offset")
    return utc_ms_checked(text)


# ---- request bodies -----------------------------------------------------------------------------

FIELDS = ("type", "data", "source", "ts")


class _Invalid(Exception):
    """Some event of the batch is bad: the slow path finds which, and why."""


class EventBatch:
    """Turns a request body into `Event`s, or raises ApiError (400, 413) saying what is wrong.

    `streams` are the streams the API admits; `max_events` the most one request may carry. The
    pydantic model checks every event in one call; the happy path then only converts `ts` and
    builds the `Event`. Any failure goes to `_errors`, which names every bad event and why.
    """

    def __init__(self, streams: list[str], max_events: int) -> None:
        self.streams = tuple(streams)
        self.max_events = max_events
        alternatives = "|".join(re.escape(s) for s in self.streams)
        type_pattern = rf"^(?:{alternatives})\.[A-Za-z0-9_][A-Za-z0-9_.:\-]{{0,{MAX_NAME_LEN - 1}}}$"

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
            raise ApiError(413, {"error": "too_many_events",
                                 "reason": f"{len(items)} events; at most {self.max_events} a request"})
        try:
            valid = self._validate(items)
            events: list[Event] = []
            append = events.append
            for event, item in zip(valid, items, strict=True):
                if len(event) != len(item):
                    raise _Invalid
                ts = event.get("ts")
                append(Event(event["type"], event["data"], event.get("source", DEFAULT_SOURCE),
                             None if ts is None else utc_ms_checked(ts)))
            return events
        except (ValidationError, ValueError, _Invalid):
            raise ApiError(400, {"error": "invalid_events", "errors": self._errors(items)}) from None

    def _parse(self, body: bytes, ndjson: bool) -> list[Any]:
        if not ndjson:
            try:
                items = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, {"error": "invalid_json", "reason": str(exc)}) from None
            if not isinstance(items, list):
                raise ApiError(400, {"error": "invalid_json", "reason": "the body must be a JSON array of events"})
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
                raise ApiError(413, {"error": "too_many_events",
                                     "reason": f"more than {self.max_events} events; at most {self.max_events} a request"})
        return items

    def _errors(self, items: list[Any]) -> list[dict[str, Any]]:
        """Every bad event's index and reason (the slow path, after the fast one refused)."""
        reasons: dict[int, list[str]] = {}
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
                    reasons.setdefault(index, []).append(f"unknown field {key[:40]!r} (an event has {', '.join(FIELDS)})")
            ts = item.get("ts")
            if index not in reasons and isinstance(ts, str):
                try:
                    utc_ms_checked(ts)
                except ValueError:
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
            return f"ts {item['ts'][:40]!r} is not RFC 3339 with an offset (e.g. 2026-11-23T09:15:02.125+01:00)"
        return f"{field} is not valid"

    def _type_reason(self, value: str) -> str:
        stream, dot, name = value.partition(".")
        shown = value if len(value) <= 60 else value[:57] + "..."
        if not dot or not stream or not name:
            return f"type {shown!r} is not 'stream.name'"
        if stream not in self.streams:
            return f"stream {stream[:40]!r} is not accepted here (accepted: {', '.join(self.streams)})"
        return (f"type {shown!r}: the name after the stream must be 1 to {MAX_NAME_LEN} characters "
                "of A-Z a-z 0-9 _ . : -")


# ---- the app ------------------------------------------------------------------------------------


class EventApi:
    """`POST /v1/events`: auth, limits, idempotency, one commit per request."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox) -> None:
        api = cfg.local_api
        self.outbox = outbox
        self.max_body = api.max_body_bytes
        self.batch = EventBatch(api.streams, api.max_events)
        token = read_secret(api.token_file)
        if token is None:
            log.warning("local API: no [local_api] token_file is set, so POST /v1/events refuses every "
                        "request (401) until one is")
            self._expected: bytes | None = None
        elif not token.strip():
            log.warning("local API: the token file %s is empty, so POST /v1/events refuses every request (401)",
                        api.token_file)
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

    async def handle(self, request: Request) -> Response:
        """Answer one request; every refusal is a JSON body with an `error` code."""
        try:
            return await self._handle(request)
        except ApiError as exc:
            return json_response(exc.status, exc.body, exc.headers)

    async def _handle(self, request: Request) -> Response:
        if not self.authorized(request):
            raise ApiError(401, {"error": "unauthorized", "reason": "a valid 'Authorization: Bearer <token>' is needed"},
                           {"WWW-Authenticate": 'Bearer realm="store-agent"'})
        key = request.headers.get("idempotency-key")
        if key is not None and not _KEY_CHARS.fullmatch(key):
            raise ApiError(400, {"error": "invalid_idempotency_key",
                                 "reason": f"1 to {MAX_KEY_LEN} visible ASCII characters"})
        body = await self._read_body(request)
        ndjson = request.headers.get("content-type", "").partition(";")[0].strip().lower() == NDJSON
        if key is None:
            events = self.batch.decode(body, ndjson)
            committed = await self._commit(events, None)
            return Response(_answer(committed), 200, media_type=JSON_TYPE)
        if key in self._inflight:
            raise ApiError(409, {"error": "request_in_progress",
                                 "reason": "a request with this Idempotency-Key is still being committed"})
        self._inflight.add(key)
        try:
            digest = hashlib.sha256(body).hexdigest().encode()
            stored = lookup(self.outbox.read_conn(), key)
            if stored is not None:
                return _replay(stored, digest)
            events = self.batch.decode(body, ndjson)
            committed = await self._commit(events, Dedup(NAMESPACE, key, stored_result(digest)))
            if committed.duplicate:  # cannot happen while the key is in flight here; kept safe all the same
                return _replay(committed.result, digest)
            return Response(_answer(committed), 200, media_type=JSON_TYPE)
        finally:
            self._inflight.discard(key)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:  # stop reading: the rest is never buffered
                    raise self._too_large()
                chunks.append(chunk)
        except ClientDisconnect:  # nobody is left to answer; nothing was committed
            raise ApiError(400, {"error": "incomplete_body"}) from None
        return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return ApiError(413, {"error": "body_too_large", "reason": f"at most {self.max_body} bytes a request"},
                        {"Connection": "close"})

    async def _commit(self, events: list[Event], dedup: Dedup | None) -> Committed:
        try:
            return await self.outbox.commit(events, dedup=dedup)
        except BufferUnavailable:
            raise ApiError(503, {"error": "buffer_full", "reason": "the buffer is at its disk cap; retry later"},
                           {"Retry-After": str(RETRY_AFTER_S)}) from None


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
        raise ApiError(422, {"error": "idempotency_key_reused",
                             "reason": "this Idempotency-Key was used for a different request body"})
    return Response(_answer(committed), 200, {"Idempotent-Replayed": "true"}, media_type=JSON_TYPE)


def make_app(cfg: AgentConfig, outbox: Outbox, reporter: StatusReporter, uplink: Uplink) -> Starlette:
    """The local web server's app: `/v1/events`, `/healthz`, `/metrics`, `/v1/status`, `/v1/drain`.

    Raises ConfigError when `[local_api] token_file` is set but cannot be read.
    """
    events = EventApi(cfg, outbox)

    async def healthz(request: Request) -> Response:
        ok = reporter.healthy()
        up = uplink.status
        body = {
            "ok": ok,
            "version": __version__,
            "buffer": {"open": outbox.alive, "events": outbox.count, "bytes": outbox.bytes},
            "mqtt": {"configured": up.configured, "connected": up.connected, "last_error": up.last_error},
        }
        return json_response(200 if ok else 503, body)

    async def metrics(request: Request) -> Response:
        return Response(reporter.prometheus(), 200, media_type=PROMETHEUS_TYPE)

    async def status(request: Request) -> Response:
        return json_response(200, reporter.status())

    async def drain(request: Request) -> Response:
        uplink.attempt_now()
        return json_response(200, reporter.status())

    return Starlette(
        routes=[
            Route("/v1/events", events.handle, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/v1/drain", drain, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed"}
    return json_response(exc.status_code, {"error": names.get(exc.status_code, "http_error")}, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # one log line (logsetup keeps it to the exception's type and text); nothing of it in the answer
    log.error("local API: %s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return json_response(500, {"error": "internal_error"})

