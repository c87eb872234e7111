"""The POS line protocol `stxetx` (contract section 4.1): agent/protocols/stxetx.py, and the driver over real ptys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from functools import reduce
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer import Outbox
from agent.config import PosSection
from agent.core.envelope import Event
from agent.health import HealthBoard
from agent.protocols.stxetx import (
    ACK,
    MAX_PAYLOAD,
    NAK,
    Frame,
    FrameDecoder,
    FrameError,
    InvalidTransaction,
    Nak,
    Transaction,
    encode_frame,
    lrc,
    parse_transaction,
)
from agent.sink import Committed, Dedup
from drivers.pos import StxEtxDriver
from tests.support.ptys import Pty

# The payload example of contract section 4.1, as a POS would send it.
CONTRACT_PAYLOAD = {
    "txn_id": "R1-000123",
    "register": "R1",
    "ts": "2026-11-23T16:15:02+08:00",
    "kind": "sale",
    "items": [{"gtin": "06901234567892", "qty": 1, "unit_price": "12.50"}],
    "total": "12.50",
    "currency": "CNY",
}

payloads = st.binary(max_size=300).map(lambda b: bytes(x | 0x20 if x < 0x20 else x for x in b))


def decode(data: bytes) -> list:
    return FrameDecoder().feed(data)


def decode_pieces(pieces: list[bytes]) -> list:
    decoder = FrameDecoder()
    out = []
    for piece in pieces:
        out += decoder.feed(piece)
    return out


# --- framing -------------------------------------------------------------------------------------


def test_constants() -> None:
    assert (ACK, NAK) == (0x06, 0x15)


def test_lrc_is_xor_of_payload_and_etx() -> None:
    payload = b'{"txn_id":"R1-000123"}'
    assert lrc(payload) == reduce(lambda a, b: a ^ b, payload, 0x03)
    assert lrc(b"") == 0x03
    assert encode_frame(b"A") == b"\x02A\x03" + bytes([0x41 ^ 0x03])


@given(payloads)
def test_lrc_matches_a_plain_loop(payload: bytes) -> None:
    assert lrc(payload) == reduce(lambda a, b: a ^ b, payload, 0x03)


@given(payloads)
def test_round_trip(payload: bytes) -> None:
    assert decode(encode_frame(payload)) == [Frame(payload)]


def test_encode_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(FrameError):
        encode_frame(b"a\nb")
    with pytest.raises(FrameError):
        encode_frame(b"x" * (MAX_PAYLOAD + 1))
    assert len(encode_frame(b"x" * MAX_PAYLOAD)) == MAX_PAYLOAD + 3


def test_bad_lrc_is_a_nak() -> None:
    frame = bytearray(encode_frame(b'{"a":1}'))
    frame[-1] ^= 0xFF
    assert decode(bytes(frame)) == [Nak("bad LRC")]


def test_payload_limit_is_64_kib() -> None:
    good = encode_frame(b"x" * MAX_PAYLOAD)
    assert decode(good) == [Frame(b"x" * MAX_PAYLOAD)]
    over = b"\x02" + b"x" * (MAX_PAYLOAD + 1) + b"\x03\x00"
    after = encode_frame(b"next")
    # one NAK for the oversized frame (its ETX and LRC belong to the same bad run), then recovery
    assert decode(over + after) == [Nak(f"frame over {MAX_PAYLOAD} bytes of payload"), Frame(b"next")]


def test_oversize_is_refused_as_soon_as_it_is_over() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x02" + b"x" * MAX_PAYLOAD) == []
    assert decoder.feed(b"x") == [Nak(f"frame over {MAX_PAYLOAD} bytes of payload")]
    assert decoder.feed(b"y" * 1000) == []  # the rest of that frame: same run, no second NAK


def test_one_nak_per_run_of_junk() -> None:
    frame = encode_frame(b"ok")
    assert decode(b"noise") == [Nak("bytes outside a frame")]
    assert decode_pieces([b"no", b"i", b"se\r\n"]) == [Nak("bytes outside a frame")]
    assert decode(b"ab" + frame + b"cd" + frame + frame) == [
        Nak("bytes outside a frame"),
        Frame(b"ok"),
        Nak("bytes outside a frame"),
        Frame(b"ok"),
        Frame(b"ok"),
    ]


def test_tail_of_a_frame_cut_off_by_a_restart() -> None:
    frame = encode_frame(b'{"txn_id":"R1-1"}')
    tail = frame[5:]
    assert decode(tail + frame) == [Nak("bytes outside a frame"), Frame(b'{"txn_id":"R1-1"}')]


def test_stx_inside_an_unfinished_frame_abandons_it() -> None:
    frame = encode_frame(b"second")
    assert decode(b"\x02first" + frame) == [Nak("STX inside an unfinished frame"), Frame(b"second")]
    # an empty one (STX STX) carried nothing and gets no answer of its own
    assert decode(b"\x02" + frame) == [Frame(b"second")]


def test_control_byte_inside_a_frame_is_a_framing_error() -> None:
    frame = encode_frame(b"good")
    assert decode(b"\x02ab\ncd\x03x" + frame) == [Nak("control byte 0x0a inside a frame"), Frame(b"good")]


def test_lrc_byte_may_be_any_value() -> None:
    # payloads whose LRC is NUL, STX, ETX, ACK and NAK: the byte after ETX is always the LRC
    for target in (0x00, 0x02, 0x03, 0x06, 0x15):
        payload = bytes([0x61, target ^ 0x03 ^ 0x61])
        assert lrc(payload) == target
        assert decode(encode_frame(payload) * 2) == [Frame(payload), Frame(payload)]


def test_reset_forgets_a_partial_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b'\x02{"half')
    assert decoder.in_frame
    decoder.reset()
    assert not decoder.in_frame
    assert decoder.feed(encode_frame(b"x")) == [Frame(b"x")]


STREAM = (
    b"junk"
    + encode_frame(b'{"a":1}')
    + b"\x02cut"
    + encode_frame(b"B" * 40)
    + b"\x02bad\x03\x00"
    + encode_frame(b"")
    + b"\x02x\x01y"
    + encode_frame(b"end")
)


def test_split_at_every_byte_boundary_decodes_the_same() -> None:
    whole = decode(STREAM)
    assert whole == [
        Nak("bytes outside a frame"),
        Frame(b'{"a":1}'),
        Nak("STX inside an unfinished frame"),
        Frame(b"B" * 40),
        Nak("bad LRC"),
        Frame(b""),
        Nak("control byte 0x01 inside a frame"),
        Frame(b"end"),
    ]
    for k in range(len(STREAM) + 1):
        assert decode_pieces([STREAM[:k], STREAM[k:]]) == whole, k
    assert decode_pieces([bytes([b]) for b in STREAM]) == whole


# --- properties ----------------------------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    results = decode(data)
    assert all(isinstance(r, Frame | Nak) for r in results)
    for r in results:
        if isinstance(r, Frame):
            assert len(r.payload) <= MAX_PAYLOAD and not re.search(rb"[\x00-\x1f]", r.payload)


@given(st.binary(max_size=200), payloads, st.binary(max_size=200))
def test_good_frame_in_noise_is_recovered(before: bytes, payload: bytes, after: bytes) -> None:
    # noise that ends right after an unfinished frame's ETX makes our STX that frame's LRC byte:
    # no decoder can tell, so that one case is left out
    if re.search(rb"\x02[\x20-\xff]*\x03\Z", before):
        before += b"\x00"
    results = decode(before + encode_frame(payload) + after)
    assert Frame(payload) in results


@given(st.lists(st.one_of(payloads.map(encode_frame), st.binary(max_size=50)), max_size=8), st.data())
@settings(max_examples=200)
def test_any_chunking_decodes_the_same(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode_pieces(pieces) == decode(stream)


@given(st.binary(max_size=500))
def test_parse_transaction_never_raises(data: bytes) -> None:
    assert isinstance(parse_transaction(data), Transaction | InvalidTransaction)


@given(
    st.dictionaries(
        st.sampled_from(list(CONTRACT_PAYLOAD)),
        st.one_of(
            st.none(),
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
def test_parse_transaction_on_mangled_objects_never_raises(changes: dict) -> None:
    payload = json.dumps({**CONTRACT_PAYLOAD, **changes}).encode()  # json: integers past 64 bits too
    assert isinstance(parse_transaction(payload), Transaction | InvalidTransaction)


# --- the transaction payload ---------------------------------------------------------------------


def test_contract_example_is_a_sale() -> None:
    txn = parse_transaction(orjson.dumps(CONTRACT_PAYLOAD))
    assert isinstance(txn, Transaction)
    assert (txn.txn_id, txn.register, txn.event_type) == ("R1-000123", "R1", "pos.sale")
    assert txn.ts_utc == "2026-11-23T08:15:02.000Z"
    assert txn.data == CONTRACT_PAYLOAD


def test_optional_fields_and_extra_keys_are_kept() -> None:
    payload = {
        **CONTRACT_PAYLOAD,
        "kind": "return",
        "member_id": "M1",
        "coupons": ["C-5"],
        "pickup_code": "123456",
        "cashier": "07",
        "items": [{"gtin": "06901234567892", "qty": "0.350", "unit_price": "39.80", "name": "苹果"}],
    }
    txn = parse_transaction(orjson.dumps(payload))
    assert isinstance(txn, Transaction)
    assert txn.event_type == "pos.return"
    assert txn.data == payload


def test_ts_is_optional_and_keeps_milliseconds() -> None:
    no_ts = {k: v for k, v in CONTRACT_PAYLOAD.items() if k != "ts"}
    txn = parse_transaction(orjson.dumps(no_ts))
    assert isinstance(txn, Transaction) and txn.ts_utc is None
    txn = parse_transaction(orjson.dumps({**CONTRACT_PAYLOAD, "ts": "2026-11-23T00:15:02.1257-05:00"}))
    assert isinstance(txn, Transaction) and txn.ts_utc == "2026-11-23T05:15:02.125Z"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"total": 12.5}, "total: money must be a decimal string"),
        ({"items": [{"gtin": "06901234567892", "qty": 1, "unit_price": 12.5}]}, "items[0].unit_price: money"),
        ({"total": "12,50"}, "total: must be a decimal string"),
        ({"ts": "2026-11-23T16:15:02"}, "ts: ts '2026-11-23T16:15:02' is not RFC 3339 with an offset"),
        ({"kind": "refund"}, "kind:"),
        ({"txn_id": ""}, "txn_id:"),
        ({"currency": "cny"}, "currency:"),
        (
            {"items": [{"gtin": "ABC", "qty": 1, "unit_price": "1.00"}]},
            "items[0].gtin: must be 8 to 14 digits",
        ),
        ({"items": [{"gtin": "06901234567892", "qty": True, "unit_price": "1.00"}]}, "items[0].qty"),
        ({"coupons": "C-5"}, "coupons:"),
    ],
)
def test_invalid_transactions_say_why(change: dict, reason: str) -> None:
    result = parse_transaction(orjson.dumps({**CONTRACT_PAYLOAD, **change}))
    assert isinstance(result, InvalidTransaction)
    assert reason in result.reason


def test_missing_key_and_non_objects() -> None:
    no_register = {k: v for k, v in CONTRACT_PAYLOAD.items() if k != "register"}
    result = parse_transaction(orjson.dumps(no_register))
    assert isinstance(result, InvalidTransaction) and result.reason == "register: required"
    assert parse_transaction(b"[1, 2]").reason == "payload is not a JSON object"  # type: ignore[union-attr]
    assert parse_transaction(b"{oops").reason.startswith("payload is not JSON")  # type: ignore[union-attr]
    bad = parse_transaction(b'{"a": "\xff"}')
    assert isinstance(bad, InvalidTransaction) and bad.reason == "payload is not UTF-8 (at byte 7)"
    assert bad.data == {"raw": base64.b64encode(b'{"a": "\xff"}').decode(), "reason": bad.reason}


# --- payloads that cannot be stored exactly (issue 12) ------------------------------------------


def nested_payload(depth: int) -> bytes:
    """The contract's transaction with an extra key nested so the whole payload is `depth` levels deep."""
    lists = depth - 1  # the payload object itself is the first level
    return orjson.dumps(CONTRACT_PAYLOAD)[:-1] + b',"deep":' + b"[" * lists + b"1" + b"]" * lists + b"}"


def test_nesting_the_envelope_can_store_is_a_transaction() -> None:
    result = parse_transaction(nested_payload(254))
    assert isinstance(result, Transaction) and result.txn_id == "R1-000123"


@pytest.mark.parametrize("depth", [255, 600, 1022, 1024])
def test_deeper_nesting_is_an_invalid_transaction(depth: int) -> None:
    # valid JSON that orjson reads but cannot write back: it used to get neither ACK nor NAK
    payload = nested_payload(depth)
    result = parse_transaction(payload)
    assert isinstance(result, InvalidTransaction)
    assert result.reason == "payload: JSON nests deeper than 254 levels"
    assert base64.b64decode(result.data["raw"]) == payload


def test_integers_beyond_64_bits_are_invalid_never_floats() -> None:
    payload = orjson.dumps(CONTRACT_PAYLOAD)[:-1] + b',"points":123456789012345678901234567890}'
    result = parse_transaction(payload)
    assert isinstance(result, InvalidTransaction)
    offset = payload.index(b"1234567890123")
    assert result.reason == (
        f"payload: integer 123456789012345678901234567890 at byte {offset} is beyond "
        "64 bits and would lose digits (send it as a string)"
    )
    below = orjson.dumps(CONTRACT_PAYLOAD)[:-1] + b',"points":-9223372036854775809}'
    assert isinstance(parse_transaction(below), InvalidTransaction)


@pytest.mark.parametrize(
    "literal, value",
    [
        (b"18446744073709551615", (1 << 64) - 1),
        (b"-9223372036854775808", -(1 << 63)),
        (b'"123456789012345678901234567890"', "123456789012345678901234567890"),
    ],
)
def test_64_bit_integers_and_long_digit_strings_keep_their_digits(literal: bytes, value: object) -> None:
    result = parse_transaction(orjson.dumps(CONTRACT_PAYLOAD)[:-1] + b',"points":' + literal + b"}")
    assert isinstance(result, Transaction) and result.data["points"] == value
    assert type(result.data["points"]) is type(value)


def test_lrc_differing_only_in_the_high_bit_is_a_nak() -> None:
    # issue 17: a 7-bit LRC comparison would take this frame
    payload = orjson.dumps(CONTRACT_PAYLOAD)
    good = encode_frame(payload)
    flipped = good[:-1] + bytes([good[-1] ^ 0x80])
    assert decode(flipped) == [Nak("bad LRC")]
    assert decode(good) == [Frame(payload)]


# --- the same over a real pty, through the driver and a real buffer -----------------------------


class _Kept:
    """The real Outbox as the driver's sink, keeping what was committed through it (its data)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.events: list[Event] = []

    async def commit(self, events: list[Event], *, dedup: Dedup | None = None) -> Committed:
        committed = await self.outbox.commit(events, dedup=dedup)
        self.events += events
        return committed


async def _answer(master: int, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return os.read(master, 1)
        except BlockingIOError:
            if loop.time() > deadline:
                raise AssertionError(f"no answer within {timeout} s") from None
            await asyncio.sleep(0.002)


def _over_a_pty(tmp_path: Path, frames: list[bytes]) -> tuple[list[bytes], list[Event], int]:
    """Send each frame on a real pty to a running StxEtxDriver; (answers, committed events, events in the buffer)."""

    async def main() -> tuple[list[bytes], list[Event], int]:
        pty = Pty()
        outbox = Outbox(tmp_path / "buffer.db", tenant="acme", store="s1", agent="a1").start()
        sink = _Kept(outbox)
        health = HealthBoard()
        driver = StxEtxDriver(PosSection(name="front-1", port=pty.path), sink, health)  # type: ignore[arg-type]
        task = asyncio.create_task(driver.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # what is written before the driver has the line open may never reach it: wait, as the driver tests do
        while not any(d["kind"] == "pos" and d["up"] for d in health.snapshot()):
            assert not task.done() and loop.time() < deadline, "the driver did not open the line"
            await asyncio.sleep(0.005)
        try:
            answers = []
            for data in frames:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(pty.master, view) :]
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                answers.append(await _answer(pty.master))
            return answers, sink.events, outbox.count
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            outbox.close()
            pty.close()

    return asyncio.run(main())


def test_deep_nesting_over_the_line_is_acked_as_pos_invalid(tmp_path: Path) -> None:
    deep = nested_payload(1022)
    answers, events, count = _over_a_pty(
        tmp_path, [encode_frame(deep), encode_frame(orjson.dumps(CONTRACT_PAYLOAD))]
    )
    assert answers == [bytes([ACK]), bytes([ACK])]  # the POS is not stuck on it, and goes on
    assert [e.type for e in events] == ["pos.invalid", "pos.sale"] and count == 2
    assert events[0].data == {
        "raw": base64.b64encode(deep).decode(),
        "reason": "payload: JSON nests deeper than 254 levels",
    }


def test_a_huge_integer_over_the_line_is_acked_as_pos_invalid(tmp_path: Path) -> None:
    payload = orjson.dumps(CONTRACT_PAYLOAD)[:-1] + b',"points":123456789012345678901234567890}'
    answers, events, count = _over_a_pty(tmp_path, [encode_frame(payload)])
    assert answers == [bytes([ACK])] and [e.type for e in events] == ["pos.invalid"] and count == 1
    assert base64.b64decode(events[0].data["raw"]) == payload  # every digit kept, in the raw bytes


def test_an_lrc_off_by_the_high_bit_is_naked_over_the_line(tmp_path: Path) -> None:
    good = encode_frame(orjson.dumps(CONTRACT_PAYLOAD))
    answers, events, count = _over_a_pty(tmp_path, [good[:-1] + bytes([good[-1] ^ 0x80]), good])
    assert answers == [bytes([NAK]), bytes([ACK])]
    assert [e.type for e in events] == ["pos.sale"] and count == 1
