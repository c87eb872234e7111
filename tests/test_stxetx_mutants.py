"""Tests written to kill surviving mutants of agent/protocols/stxetx.py (bench/mutation.sh).

Each test names the promise it guards; the mutants it was written for are listed in the README's
Tests section.
"""

from __future__ import annotations

import base64

import orjson
import pytest

from agent.protocols.stxetx import (
    ETX,
    MAX_PAYLOAD,
    STX,
    Frame,
    FrameDecoder,
    FrameError,
    InvalidTransaction,
    Nak,
    encode_frame,
    lrc,
    parse_transaction,
)


def test_an_lrc_that_differs_only_in_the_high_bit_is_a_nak() -> None:
    """The check is on all 8 bits: a 7-bit comparison would take a corrupted frame as good."""
    payload = b'{"a":1}'
    good = encode_frame(payload)
    assert FrameDecoder().feed(good) == [Frame(payload)]
    assert FrameDecoder().feed(good[:-1] + bytes([good[-1] ^ 0x80])) == [Nak("bad LRC")]


def test_lrc_is_the_xor_of_every_payload_byte_and_etx() -> None:
    """The folding shortcut agrees with the definition for every length around the fold boundaries."""
    for n in range(0, 40):
        payload = bytes((37 * i + 11) % 0x5F + 0x20 for i in range(n))
        expected = ETX
        for b in payload:
            expected ^= b
        assert lrc(payload) == expected, n
    assert encode_frame(b"x")[0] == STX


def test_after_reset_junk_before_the_next_frame_is_one_nak_then_the_frame_decodes() -> None:
    """`reset()` goes back to the idle state itself, not just "not in a frame": bytes that do not
    frame right after it are NAKed once, and the next frame still decodes."""
    decoder = FrameDecoder()
    assert decoder.feed(b'\x02{"cut') == []
    decoder.reset()
    assert not decoder.in_frame
    assert decoder.feed(b'off"}\x03' + encode_frame(b'{"a":1}')) == [
        Nak("bytes outside a frame"),
        Frame(b'{"a":1}'),
    ]


# ---- the reason a pos.invalid event carries (committed with the raw frame) -----------------------

_GOOD = {
    "txn_id": "t1",
    "register": "r1",
    "kind": "sale",
    "total": "1.00",
    "currency": "EUR",
    "items": [{"gtin": "12345678", "qty": 1, "unit_price": "1.00"}],
}


def _reason(**changes: object) -> str:
    result = parse_transaction(orjson.dumps({**_GOOD, **changes}))
    assert isinstance(result, InvalidTransaction)
    return result.reason


def test_a_bad_unit_price_is_explained_as_a_decimal_string() -> None:
    items = [{"gtin": "12345678", "qty": 1, "unit_price": "1,00"}]
    assert _reason(items=items) == 'items[0].unit_price: must be a decimal string, e.g. "12.50"'


def test_a_non_string_id_is_not_called_money() -> None:
    """Only `price`/`total` fields get the money wording; any other wrong type keeps pydantic's."""
    reason = _reason(txn_id=5)
    assert reason.startswith("txn_id: ") and "money" not in reason and ";" not in reason


def test_up_to_three_errors_are_listed_and_the_rest_counted() -> None:
    three = _reason(txn_id=5, register=6, currency="eur")
    assert three.count("; ") == 2 and "more)" not in three
    assert [p.split(":")[0] for p in three.split("; ")] == ["txn_id", "register", "currency"]
    four = _reason(txn_id=5, register=6, currency="eur", total=1)
    assert four.count("; ") == 2 and four.endswith(" (and 1 more)")
    five = _reason(txn_id=5, register=6, currency="eur", total=1, kind="x")
    assert five.count("; ") == 2 and five.endswith(" (and 2 more)")


def test_a_json_value_that_is_not_an_object_keeps_its_raw_bytes() -> None:
    """pos.invalid carries the frame as sent: the raw bytes, base64 in the event's data."""
    result = parse_transaction(b"[1]")
    assert isinstance(result, InvalidTransaction)
    assert result.raw == b"[1]"
    assert result.data == {
        "raw": base64.b64encode(b"[1]").decode("ascii"),
        "reason": "payload is not a JSON object",
    }


def test_frame_errors_say_what_cannot_be_framed() -> None:
    with pytest.raises(FrameError, match="payload byte 0x01 at byte 2 is below 0x20"):
        encode_frame(b'{"\x01')
    with pytest.raises(FrameError, match=f"over {MAX_PAYLOAD}"):
        encode_frame(b"a" * (MAX_PAYLOAD + 1))
