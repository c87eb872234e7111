import random
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.envelope import (
    EnvelopeEncoder,
    EnvelopeError,
    Event,
    UtcFormatter,
    Uuid7,
    id_time,
    priority_of,
    stream_of,
    utc_ms,
)


def test_uuid7_ids_are_version_7_rfc_variant_time_ordered_and_unique():
    gen = Uuid7(random.Random(1))
    ids = []
    for ms in (1_764_496_641_412, 1_764_496_641_412, 1_764_496_641_413, 1_764_496_641_500):
        stem = gen.stem(ms)
        ids += [f"{stem}{i:04x}" for i in range(300)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    assert ids == sorted(ids), "ids must sort in the order they were made"
    assert len(set(ids)) == len(ids)
    assert int(ids[0][:8] + ids[0][9:13], 16) == 1_764_496_641_412


def test_uuid7_counter_overflow_borrows_the_next_millisecond():
    gen = Uuid7(random.Random(2))
    stems = [gen.stem(1000) for _ in range(5000)]
    assert stems == sorted(stems) and len(set(stems)) == 5000


def test_clock_going_back_keeps_ids_increasing():
    gen = Uuid7(random.Random(3))
    a = gen.make(2_000_000)
    b = gen.make(1_000_000)  # the clock stepped back
    assert b > a


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-23T16:15:02+08:00", "2026-11-23T08:15:02.000Z"),
        ("2026-11-23T08:15:02.125Z", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23T08:15:02.1259Z", "2026-11-23T08:15:02.125Z"),
        ("2026-01-01T00:30:00-01:00", "2026-01-01T01:30:00.000Z"),
        ("2026-11-23t08:15:02z", "2026-11-23T08:15:02.000Z"),
    ],
)
def test_utc_ms_converts_offsets(text, expected):
    assert utc_ms(text) == expected


@pytest.mark.parametrize(
    "text", ["2026-11-23T08:15:02", "2026-11-23", "yesterday", "", "2026-13-01T00:00:00Z"]
)
def test_timestamps_without_offset_or_malformed_are_errors(text):
    with pytest.raises(EnvelopeError):
        utc_ms(text)


def test_utc_formatter():
    assert UtcFormatter().format(1_764_496_641_412) == "2025-11-30T09:57:21.412Z"


@pytest.mark.parametrize("bad", ["pos", ".sale", "pos.", ""])
def test_event_type_must_be_stream_dot_name(bad):
    with pytest.raises(EnvelopeError):
        stream_of(bad)


def test_priorities():
    assert priority_of("traffic") < priority_of("app") < priority_of("pos")
    assert priority_of("scan") == priority_of("command") == priority_of("pickup") == priority_of("pos")


def test_envelopes_are_complete_json_with_the_agents_identity():
    enc = EnvelopeEncoder("acme", "sh-0012", 'till "1"')
    events = [
        Event("pos.sale", {"total": "12.50"}, "pos:front-1", "2026-11-23T08:15:02.125Z"),
        Event("app.checkin", {"n": 1}, "local_api"),
        Event("app.checkin", {"n": 2}, "local_api"),
    ]
    bodies = enc.encode_many(events, 41, "0193a5f0-7c1e-7d2a-9b1f-3c2e8a1d", "2026-11-30T00:00:00.000Z")
    parsed = [orjson.loads(b) for b in bodies]
    assert [p["seq"] for p in parsed] == [41, 42, 43]
    assert [p["id"] for p in parsed] == [f"0193a5f0-7c1e-7d2a-9b1f-3c2e8a1d000{i}" for i in range(3)]
    assert parsed[0] == {
        "id": "0193a5f0-7c1e-7d2a-9b1f-3c2e8a1d0000",
        "seq": 41,
        "ts": "2026-11-23T08:15:02.125Z",
        "type": "pos.sale",
        "source": "pos:front-1",
        "tenant": "acme",
        "store": "sh-0012",
        "agent": 'till "1"',
        "data": {"total": "12.50"},
    }
    assert parsed[1]["ts"] == "2026-11-30T00:00:00.000Z"
    assert id_time(bodies[0]) == int("0193a5f07c1e", 16) / 1000


@pytest.mark.parametrize("data", [[1, 2], "text", {"x": object()}])
def test_data_that_is_not_a_json_object_is_refused(data):
    enc = EnvelopeEncoder("a", "b", "c")
    with pytest.raises(EnvelopeError):
        enc.encode_many([Event("app.x", data, "s")], 1, "0" * 32, "2026-11-30T00:00:00.000Z")


@given(
    st.dictionaries(
        st.text(),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
            lambda c: st.lists(c) | st.dictionaries(st.text(), c),
            max_leaves=10,
        ),
    ),
    st.text(min_size=1),
    st.text(min_size=1),
)
def test_any_json_data_round_trips(data, name, source):
    enc = EnvelopeEncoder("acme", "s", "a")
    body = enc.encode_many([Event(f"app.{name}", data, source)], 7, "0" * 32, "2026-11-30T00:00:00.000Z")[0]
    parsed = orjson.loads(body)
    assert parsed["data"] == data and parsed["source"] == source and parsed["type"] == f"app.{name}"
