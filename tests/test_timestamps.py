"""The one RFC 3339 parser (agent.core.timestamps), and that the local API, the envelope module and the
POS line protocol all use it: a `ts` one of them accepts, every one accepts, converted the same way."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import timestamps
from agent.core.envelope import EnvelopeError, parse_ts, utc_ms
from agent.protocols.stxetx import InvalidTransaction, Transaction, parse_transaction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-23T09:15:02.125+01:00", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23T08:15:02.125Z", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23t08:15:02.125z", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23 08:15:02Z", "2026-11-23T08:15:02.000Z"),
        ("2026-11-23T08:15:02.1Z", "2026-11-23T08:15:02.100Z"),
        ("2026-11-23T08:15:02.123456789-00:00", "2026-11-23T08:15:02.123Z"),
        ("2026-01-01T00:30:00+05:45", "2025-12-31T18:45:00.000Z"),
        ("2024-02-29T23:59:59.999-23:59", "2024-03-01T23:58:59.999Z"),
    ],
)
def test_rfc3339_is_converted_to_utc_milliseconds(text: str, expected: str) -> None:
    assert timestamps.utc_ms(text) == expected
    assert utc_ms(text) == expected  # the envelope module's is the same parser


NOT_RFC3339 = [
    "2026-11-23T08:15:02",
    "2026-11-23",
    "2026-11-23T08:15Z",
    "2026-11-23T24:00:00Z",
    "2026-11-23T08:15:60Z",
    "2026-02-29T08:15:02Z",
    "2026-11-23T08:15:02+0100",
    "2026-11-23T08:15:02.Z",
    "20261123T081502Z",
    "2026-11-23T08:15:02+24:00",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "٢٠٢٦-11-23T08:15:02Z",
    "2026-11-23T08:15:02Z\n",
    "",
    "2026-W48-1T16:15:02+08:00",
    "2026-11-23T16:15+08:00",
]


@pytest.mark.parametrize("text", NOT_RFC3339)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(timestamps.TimestampError):
        timestamps.utc_ms(text)
    with pytest.raises(EnvelopeError):
        utc_ms(text)
    if text != "0001-01-01T00:00:00+01:00":  # a datetime, but before year 1 in UTC: no envelope `ts`
        with pytest.raises(EnvelopeError):
            parse_ts(text)


def pos_payload(ts: str) -> bytes:
    return orjson.dumps(
        {
            "txn_id": "R1-000123",
            "register": "R1",
            "ts": ts,
            "kind": "sale",
            "items": [{"gtin": "06901234567892", "qty": 1, "unit_price": "12.50"}],
            "total": "12.50",
            "currency": "CNY",
        }
    )


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23T16:15+08:00",
        "2026-11-23T16:15:02+0800",
        "2026-W48-1T16:15:02+08:00",
        "2026-11-23T16:15:02",
    ],
)
def test_the_pos_line_refuses_what_the_local_api_refuses(text: str) -> None:
    """These are ISO 8601 that Python's fromisoformat reads, not RFC 3339: before, POS took them."""
    parsed = parse_transaction(pos_payload(text))
    assert isinstance(parsed, InvalidTransaction)
    assert base64.b64decode(parsed.data["raw"]) == pos_payload(text)  # kept as pos.invalid, raw


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-23T16:15:02.1+08:00", "2026-11-23T08:15:02.100Z"),
        ("2026-11-23t16:15:02.123456789+08:00", "2026-11-23T08:15:02.123Z"),
        ("2026-11-23 08:15:02z", "2026-11-23T08:15:02.000Z"),
    ],
)
def test_the_pos_line_converts_like_the_local_api(text: str, expected: str) -> None:
    parsed = parse_transaction(pos_payload(text))
    assert isinstance(parsed, Transaction)
    assert parsed.ts_utc == expected == timestamps.utc_ms(text)


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    offset_min=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
    digits=st.integers(min_value=0, max_value=9),
)
def test_conversion_agrees_with_datetime(moment: datetime, offset_min: int, digits: int) -> None:
    local = moment.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    frac = f"{local.microsecond:06d}000"[:digits]
    sign = "-" if offset_min < 0 else "+"
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:{local.minute:02d}:"
        f"{local.second:02d}{'.' + frac if digits else ''}{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    )
    utc = local.replace(microsecond=0).astimezone(UTC)
    expected = (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
        f".{(frac + '000')[:3]}Z"
    )
    assert timestamps.utc_ms(text) == expected
    assert utc_ms(text) == expected
    parsed = timestamps.parse(text)
    assert parsed == local.replace(microsecond=int((frac + "000000")[:6]) if digits else 0)
    assert parsed.utcoffset() == timedelta(minutes=offset_min)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_random_text_raises_only_timestamp_error(text: str) -> None:
    for parse in (timestamps.utc_ms, timestamps.parse):
        try:
            parse(text)
        except timestamps.TimestampError:
            pass
