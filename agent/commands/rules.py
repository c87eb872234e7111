"""The command channel's pure rules: reading a payload, the signed canonical form, the check order.

Decisions:
- A payload is read with the standard library's `json` (not orjson): the canonical form that is
  signed is `json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)` of what
  was parsed, and the cloud signs with the same library, so numbers and non-ASCII text survive
  the round trip byte for byte (orjson also refuses integers past 64 bits that `json` keeps).
- Bounds before parsing: at most `MAX_PAYLOAD` bytes (256 KiB; nothing the agent implements needs
  more) and `MAX_DEPTH` levels of nesting, checked on the bytes before the parser recurses.
- A payload that cannot be read as a command object still gets a reply when an id can be read
  from it (`"id": "…"` in its first `ID_SCAN` bytes): a hostile or truncated command is answered,
  not silently dropped. Without a readable id there is nobody to answer: one log line.
- Check order (contract section 3): `unknown_command` (the topic's last level is not implemented)
  → `forbidden` (not in `allow`, or a required signature missing, malformed, under an unknown
  key, or not verifying; an unreadable payload cannot carry a valid one) → `expired` (past
  `expires`, or a signed command without `expires`: a replay) → `invalid_args` (the payload's
  shape, `expires` not RFC 3339, the arguments against the command's model).
- Top-level keys other than `id`, `expires`, `args`, `sig` are `invalid_args`, like unknown keys
  inside `args`: a typo in a fleet script must not pass unnoticed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from agent.core.timestamps import TimestampError
from agent.core.timestamps import parse as parse_ts

MAX_PAYLOAD = 256 * 1024
MAX_DEPTH = 32
ID_SCAN = 4096
MAX_ID = 128
TOP_KEYS = frozenset({"id", "expires", "args", "sig"})
CODES = ("expired", "unknown_command", "invalid_args", "forbidden", "failed")
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\\x00-\x1f]{1,128})"')


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StatusArgs(Args):
    pass


class DrainArgs(Args):
    pass


class SetLogLevelArgs(Args):
    level: Literal["debug", "info", "warning", "error"]


class DiagnosticsArgs(Args):
    log_lines: StrictInt = Field(default=500, ge=0, le=5000)


class EraseSubjectArgs(Args):
    member_id: StrictStr | None = Field(default=None, min_length=1, max_length=256)
    token: StrictStr | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_at_least(self) -> EraseSubjectArgs:
        if self.member_id is None and self.token is None:
            raise ValueError("member_id or token (at least one)")
        return self


# The commands this agent implements; any other name is `unknown_command`.
ARGS: dict[str, type[Args]] = {
    "status": StatusArgs,
    "drain": DrainArgs,
    "set_log_level": SetLogLevelArgs,
    "diagnostics": DiagnosticsArgs,
    "erase_subject": EraseSubjectArgs,
}


@dataclass(frozen=True, slots=True)
class Policy:
    """`[commands]` as the checks need it."""

    allow: Collection[str] | None  # None: every implemented command
    require_signature: Collection[str]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A command payload as read: `id` when one could be read, `msg` when the payload is a JSON object."""

    id: str | None
    msg: dict[str, Any] | None
    problem: str | None  # why `msg` is None (or why the payload is not a command object)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


# verify(key_id, signature, signed bytes) -> True when the key is known and the signature verifies
Verifier = Callable[[str, bytes, bytes], bool]


def _depth_ok(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """Nesting of `[`/`{` outside strings stays within `limit` (checked before any recursion)."""
    if payload.count(b"[") + payload.count(b"{") <= limit:  # the usual command: no walk needed
        return True
    depth = 0
    in_str = escaped = False
    for b in payload:
        if in_str:
            if escaped:
                escaped = False
            elif b == 0x5C:
                escaped = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def scan_id(payload: bytes) -> str | None:
    """An id read from the head of a payload that is not a readable command (for the reply)."""
    match = _ID_RE.search(payload[:ID_SCAN])
    if match is None:
        return None
    try:
        text = match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def read(payload: bytes) -> Incoming:
    """Read a command payload: never raises."""
    if len(payload) > MAX_PAYLOAD:
        return Incoming(scan_id(payload), None, f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    if not _depth_ok(payload):
        return Incoming(scan_id(payload), None, f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        msg = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return Incoming(scan_id(payload), None, "payload is not UTF-8")
    except (ValueError, RecursionError) as exc:
        return Incoming(scan_id(payload), None, f"payload is not JSON: {str(exc)[:120]}")
    if not isinstance(msg, dict):
        return Incoming(None, None, "payload is not a JSON object")
    cid = msg.get("id")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_ID or not cid.isprintable():
        return Incoming(None, msg, "id missing, not a string, or not 1-128 printable characters")
    return Incoming(cid, msg, None)


def canonical(name: str, msg: dict[str, Any]) -> bytes:
    """The bytes a signature covers (contract section 3)."""
    doc = {"args": msg.get("args", {}), "expires": msg.get("expires"), "id": msg.get("id"), "name": name}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _signature(sig: Any) -> tuple[str, bytes] | None:
    """(key id, raw signature) from a `sig` object, None when it is missing or malformed."""
    import base64
    import binascii

    if not isinstance(sig, dict) or set(sig) != {"key", "value"}:
        return None
    key, value = sig["key"], sig["value"]
    if not isinstance(key, str) or not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return (key, raw) if len(raw) == 64 else None


def check(name: str, incoming: Incoming, policy: Policy, verify: Verifier, now: datetime) -> Refusal | Args:
    """The check order of contract section 3: a refusal, or the command's validated arguments."""
    model = ARGS.get(name)
    if model is None:
        return Refusal("unknown_command", f"this agent does not implement {name[:64]!r}")
    if policy.allow is not None and name not in policy.allow:
        return Refusal("forbidden", f"{name} is not in [commands] allow")
    msg = incoming.msg
    signed = name in policy.require_signature
    if signed:
        sig = _signature(msg.get("sig")) if msg is not None else None
        if sig is None:
            return Refusal("forbidden", f"{name} needs a signature: sig is missing or malformed")
        if not verify(sig[0], sig[1], canonical(name, msg)):  # type: ignore[arg-type]
            return Refusal("forbidden", "the signature does not verify under a known key")
    if msg is not None and "expires" in msg and msg["expires"] is not None:
        expires = msg["expires"]
        try:
            when = parse_ts(expires) if isinstance(expires, str) else None
        except (TimestampError, ValueError):
            when = None
        if when is None:
            return Refusal("invalid_args", "expires is not an RFC 3339 time with an offset")
        if when <= now:
            return Refusal("expired", f"expired at {expires}")
    elif signed:
        return Refusal("expired", "a signed command must carry expires")
    if msg is None or incoming.problem is not None:
        return Refusal("invalid_args", incoming.problem or "not a command object")
    extra = sorted(set(msg) - TOP_KEYS)
    if extra:
        return Refusal("invalid_args", f"unknown keys: {', '.join(k[:32] for k in extra[:5])}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        return Refusal("invalid_args", "args is not an object")
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        return Refusal("invalid_args", describe(exc))


def describe(exc: ValidationError) -> str:
    """One line naming each bad argument's path."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "args"
        parts.append(f"args.{where}: {err['msg']}" if err["loc"] else f"args: {err['msg']}")
    return "; ".join(parts)


def reply_ok(cid: str, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": cid, "ok": True, "result": result})


def reply_error(cid: str, code: str, message: str) -> bytes:
    return orjson.dumps({"id": cid, "ok": False, "error": {"code": code, "message": message}})


def event_data(cid: str, name: str, ok: bool, code: str | None) -> dict[str, Any]:
    """`command.executed` / `command.refused` data (contract section 3)."""
    data: dict[str, Any] = {"id": cid, "name": name[:128], "ok": ok}
    if code is not None:
        data["code"] = code
    return data
