"""The POS line protocol `stxetx` (contract section 4.1): framing, LRC, and the transaction payload.

    STX 0x02 | payload: UTF-8 JSON object, no byte below 0x20 | ETX 0x03 | LRC: XOR of payload and ETX

Pure: bytes in, results out. The driver (drivers/pos.py) answers each result with ACK or NAK.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from agent.core.envelope import EnvelopeError, json_problem, utc_ms
from agent.core.errors import at_byte

STX = 0x02
ETX = 0x03
ACK = 0x06
NAK = 0x15
# The contract's limit is on the payload: 64 KiB is allowed, one byte more is not.
MAX_PAYLOAD = 64 * 1024

_CONTROL = re.compile(rb"[\x00-\x1f]")


class FrameError(ValueError):
    """A payload that cannot be framed (a byte below 0x20, or over 64 KiB)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame with a good LRC: its payload (still to be validated as a transaction)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Nak:
    """Something the POS must be told to resend (answered with NAK); `reason` is for the log."""

    reason: str


FrameResult = Frame | Nak

# Decoder states
_IDLE = 0  # between frames, nothing pending
_JUNK = 1  # inside a run of bytes that do not frame; its NAK has been given
_PAYLOAD = 2  # after STX, collecting the payload
_LRC = 3  # after ETX, the next byte is the LRC


def lrc(payload: bytes) -> int:
    """The frame's check byte: XOR of the payload bytes and ETX."""
    n = len(payload)
    value = int.from_bytes(payload, "little")
    # fold the number in halves (byte-aligned), which XORs all bytes in C instead of a Python loop
    while n > 1:
        low = (n + 1) // 2
        value = (value & ((1 << (8 * low)) - 1)) ^ (value >> (8 * low))
        n = low
    return value ^ ETX


def encode_frame(payload: bytes) -> bytes:
    """STX payload ETX LRC. Raises FrameError for a payload the protocol cannot carry."""
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    bad = _CONTROL.search(payload)
    if bad is not None:
        raise FrameError(f"payload byte 0x{payload[bad.start()]:02x} {at_byte(bad.start())} is below 0x20")
    return b"\x02" + payload + b"\x03" + bytes([lrc(payload)])


class FrameDecoder:
    """Incremental decoder: `feed(chunk)` returns the frames and NAKs completed by that chunk.

    Rules (contract 4.1): bytes outside a frame are one NAK per run (a run ends at the next STX);
    an STX inside an unfinished frame abandons it (NAK) and starts a new one; a control byte in the
    payload or a payload over 64 KiB is a NAK and the rest of that frame is part of the same bad
    run; a bad LRC is a NAK. Results come out in the order of the bytes, whatever the chunking.
    """

    __slots__ = ("_state", "_buf")

    def __init__(self) -> None:
        self._state = _IDLE
        self._buf = bytearray()

    def reset(self) -> None:
        """Forget any partial frame (the line was reopened: what was cut off is gone)."""
        self._state = _IDLE
        self._buf.clear()

    @property
    def in_frame(self) -> bool:
        """True while a frame is started and not finished."""
        return self._state in (_PAYLOAD, _LRC)

    def feed(self, chunk: bytes) -> list[FrameResult]:
        """Consume `chunk`; never raises."""
        out: list[FrameResult] = []
        i = 0
        n = len(chunk)
        buf = self._buf
        while i < n:
            state = self._state
            if state == _PAYLOAD:
                m = _CONTROL.search(chunk, i)
                end = m.start() if m is not None else n
                if len(buf) + (end - i) > MAX_PAYLOAD:
                    out.append(Nak(f"frame over {MAX_PAYLOAD} bytes of payload"))
                    buf.clear()
                    self._state = _JUNK
                    i = end  # the rest of this frame is the same bad run: no second NAK
                    continue
                buf += chunk[i:end]
                if m is None:
                    return out
                byte = chunk[end]
                i = end + 1
                if byte == ETX:
                    self._state = _LRC
                elif byte == STX:
                    if buf:
                        out.append(Nak("STX inside an unfinished frame"))
                    # an empty abandoned frame (STX STX) carried nothing: no answer, so a POS
                    # that is stop-and-wait gets exactly one answer for the frame it sends now
                    buf.clear()
                else:
                    out.append(Nak(f"control byte 0x{byte:02x} inside a frame"))
                    buf.clear()
                    self._state = _JUNK
            elif state == _LRC:
                payload = bytes(buf)
                buf.clear()
                self._state = _IDLE
                if chunk[i] == lrc(payload):
                    out.append(Frame(payload))
                else:
                    out.append(Nak("bad LRC"))
                i += 1
            else:
                stx = chunk.find(b"\x02", i)
                if stx != i and state == _IDLE:
                    out.append(Nak("bytes outside a frame"))
                    self._state = _JUNK
                if stx < 0:
                    return out
                self._state = _PAYLOAD
                i = stx + 1
        return out


# ---- the transaction payload --------------------------------------------------------------------

_DECIMAL = r"^-?\d{1,15}(\.\d{1,6})?$"
Money = Annotated[StrictStr, Field(pattern=_DECIMAL)]


class _Open(BaseModel):
    # extra keys are allowed: `data` is the payload as sent, and POS vendors add fields
    model_config = ConfigDict(extra="allow", frozen=True)


class Item(_Open):
    gtin: Annotated[StrictStr, Field(pattern=r"^\d{8,14}$")]
    qty: StrictInt | StrictFloat | Annotated[StrictStr, Field(pattern=_DECIMAL)]
    unit_price: Money


class TransactionModel(_Open):
    """The payload of contract section 4.1, validated."""

    txn_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    # `register` would shadow ABCMeta.register on the model class, hence the alias
    register_: Annotated[StrictStr, Field(alias="register", min_length=1, max_length=64)]
    ts: StrictStr | None = None
    kind: Literal["sale", "return", "void"]
    items: list[Item]
    total: Money
    currency: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
    member_id: Annotated[StrictStr, Field(min_length=1)] | None = None
    coupons: list[StrictStr] | None = None
    pickup_code: Annotated[StrictStr, Field(min_length=1)] | None = None

    @field_validator("ts")
    @classmethod
    def _rfc3339(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                utc_ms(value)
            except EnvelopeError as exc:
                raise ValueError(str(exc)) from None
        return value


@dataclass(frozen=True, slots=True)
class Transaction:
    """A valid transaction: what becomes a `pos.{kind}` event."""

    txn_id: str
    register: str
    kind: str
    ts_utc: str | None  # the payload's ts as RFC 3339 UTC with ms; None if the payload had none
    data: dict[str, Any]  # the payload as sent

    @property
    def event_type(self) -> str:
        return f"pos.{self.kind}"


@dataclass(frozen=True, slots=True)
class InvalidTransaction:
    """A frame with a good LRC that is not a valid transaction: becomes `pos.invalid`."""

    raw: bytes
    reason: str

    @property
    def data(self) -> dict[str, str]:
        """The event's data: the raw payload in base64 and why it is not a transaction."""
        return {"raw": base64.b64encode(self.raw).decode("ascii"), "reason": self.reason}


def parse_transaction(payload: bytes) -> Transaction | InvalidTransaction:
    """Validate a frame's payload as a transaction; never raises."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidTransaction(payload, f"payload is not UTF-8 ({at_byte(exc.start)})")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return InvalidTransaction(payload, f"payload is not JSON: {exc}")
    if not isinstance(obj, dict):
        return InvalidTransaction(payload, "payload is not a JSON object")
    # before validation: a payload that could never be stored exactly must still get its ACK
    problem = json_problem(text, obj)
    if problem is not None:
        return InvalidTransaction(payload, f"payload: {problem}")
    try:
        model = TransactionModel.model_validate(obj)
    except ValidationError as exc:
        return InvalidTransaction(payload, _describe(exc))
    return Transaction(
        txn_id=model.txn_id,
        register=model.register_,
        kind=model.kind,
        ts_utc=utc_ms(model.ts) if model.ts is not None else None,
        data=obj,
    )


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for error in errors[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required"
        elif error["type"] == "string_pattern_mismatch" and where.endswith("gtin"):
            message = "must be 8 to 14 digits"
        elif error["type"] == "string_pattern_mismatch" and where.endswith(("price", "total", "qty")):
            message = 'must be a decimal string, e.g. "12.50"'
        elif error["type"] == "string_type" and where.endswith(("price", "total")):
            message = 'money must be a decimal string, e.g. "12.50"'
        parts.append(f"{where or 'payload'}: {message}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
