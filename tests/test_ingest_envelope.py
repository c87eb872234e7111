"""The ingest's pure parts: envelope checks, batch parsing, reject byte spans, the gap rule."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ingest.envelope import Parsed, element_spans, parse_message, parse_topic, parse_ts, subscription
from ingest.gaps import Gap, seq_gaps

TOPIC = "retail/acme/s1/a1/up/pos"
AT = "2026-11-23T08:15:03.000000+00:00"


def envelope(n: int = 1, **over: object) -> dict[str, object]:
    e: dict[str, object] = {
        "id": f"0193a5f0-7c1e-7d2a-9b1f-{n:012x}",
        "seq": n,
        "ts": "2026-11-23T08:15:02.125Z",
        "type": "pos.sale",
        "source": "pos:front-1",
        "tenant": "acme",
        "store": "s1",
        "agent": "a1",
        "data": {"total": 100},
    }
    e.update(over)
    return e


def parse(payload: bytes, topic: str = TOPIC) -> Parsed:
    out = Parsed()
    parse_message(topic, payload, "retail", AT, out)
    return out


def test_subscription_and_topic() -> None:
    assert subscription("ingest", "retail") == "$share/ingest/retail/+/+/+/up/#"
    origin = parse_topic("chain/eu/acme/s1/a1/up/pos", "chain/eu")
    assert (origin.tenant, origin.store, origin.agent) == ("acme", "s1", "a1")


def test_a_good_batch_becomes_copy_lines() -> None:
    out = parse(orjson.dumps({"agent": "a1", "events": [envelope(1), envelope(2, data={"s": "a\\b\tc\nd"})]}))
    assert not out.rejects and len(out.rows) == 2
    line = out.rows["0193a5f0-7c1e-7d2a-9b1f-000000000002"].decode()
    fields = line.rstrip("\n").split("\t")
    assert fields[4] == "2" and fields[7] == "2026-11-23T08:15:02.125Z" and fields[9] == AT
    assert fields[8] == '{"s":"a\\\\\\\\b\\\\tc\\\\nd"}'  # JSON escapes, then COPY's backslash doubling


def test_a_repeated_id_keeps_the_first_copy() -> None:
    first, second = envelope(1), envelope(1, data={"total": 999})
    out = parse(orjson.dumps({"events": [first, second]}))
    assert len(out.rows) == 1 and b'"total":100' in next(iter(out.rows.values()))


def test_not_a_batch_is_rejected_whole() -> None:
    for payload, reason in [
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"events": 5}', "not a list"),
        (b'{"agent": "a2", "events": []}', "agent"),
    ]:
        out = parse(payload)
        assert not out.rows and len(out.rejects) == 1
        assert out.rejects[0].payload == payload and reason in out.rejects[0].reason


def test_bad_envelopes_are_rejected_alone_with_their_own_bytes() -> None:
    bad = [
        envelope(2, id="not-a-uuid"),
        envelope(3, ts="2026-11-23 08:15:02"),
        envelope(4, seq="4"),
        envelope(5, seq=1.5),
        envelope(6, tenant="other"),
        envelope(7, store="s2"),
        envelope(8, agent="a2"),
        envelope(9, data={"x": "\u0000"}),
        envelope(10, ts="2026-02-30T00:00:00Z"),
        "a string",
    ]
    texts = [json.dumps(e, indent=1) for e in [envelope(1), *bad, envelope(11)]]
    payload = ('{ "agent" : "a1",\n "events" : [ ' + " ,\n ".join(texts) + " ] }").encode()
    out = parse(payload)
    assert sorted(int(line.split(b"\t")[4]) for line in out.rows.values()) == [1, 11]
    assert [r.payload for r in out.rejects] == [t.encode() for t in texts[1:-1]]
    reasons = [r.reason for r in out.rejects]
    assert reasons[0] == "events[1]: id is not a UUID" and "ts" in reasons[1] and "seq" in reasons[2]
    assert "seq" in reasons[3] and "tenant" in reasons[4] and "store" in reasons[5] and "agent" in reasons[6]
    assert "NUL" in reasons[7] and "ts" in reasons[8] and "not a JSON object" in reasons[9]


def test_a_topic_outside_the_pattern_is_a_reject() -> None:
    out = parse(orjson.dumps({"events": [envelope(1)]}), topic="retail/acme/s1/a1/down/pos")
    assert not out.rows and "not retail/tenant/store/agent/up/stream" in out.rejects[0].reason


def test_ts_needs_an_offset_and_keeps_microseconds() -> None:
    assert parse_ts("2026-11-23T23:15:02.123456789-05:00")[0] == "2026-11-23T23:15:02.123456-05:00"
    assert parse_ts("2026-11-23t08:15:02z")[0] == "2026-11-23T08:15:02Z"
    assert str(parse_ts("2026-11-23T23:15:02-05:00")[1]) == "2026-11-24"  # the UTC day picks the partition
    for bad in ("2026-11-23T08:15:02", "2026-11-23", "23/11/2026 08:15:02Z", "2026-12-31T23:59:60Z"):
        try:
            parse_ts(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(json_values, max_size=6), st.sampled_from(["", " ", "\n  ", "\t"]), json_values)
def test_element_spans_find_each_element_as_written(elements: list[object], ws: str, other: object) -> None:
    body = f",{ws}".join(json.dumps(e, ensure_ascii=False, indent=None if ws == "" else 1) for e in elements)
    payload = f'{{"x":{json.dumps(other)},{ws}"events"{ws}:{ws}[{ws}{body}{ws}]{ws}}}'.encode()
    spans = element_spans(payload)
    assert [json.loads(payload[a:b]) for a, b in spans] == elements


def test_gaps_explained_by_a_drop_report() -> None:
    # 4..5 lost before any report: with a report of 2 at seq 9, the first 2 missing are explained
    assert seq_gaps([1, 2, 3, 6, 7, 8, 9], [(9, 2)]) == [Gap(3, 6, 2, True)]
    # more missing than reported: the gap that goes past the count is not explained
    assert seq_gaps([1, 3, 7, 9], [(9, 2)]) == [Gap(1, 3, 1, True), Gap(3, 7, 3, False), Gap(7, 9, 1, False)]
    # a report before the gap cannot explain it
    assert seq_gaps([1, 2, 5], [(2, 5)]) == [Gap(2, 5, 2, False)]
    assert seq_gaps([3, 1, 2, 2], []) == []
