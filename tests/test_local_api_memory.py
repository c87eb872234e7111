"""What the local API's door holds per event between parsing a request and its commit.

The events of a request wait in memory until the outbox has committed them (four clients: four
requests of 500 at once). They once held each event's `data` as the bytes orjson.dumps returned,
and those sit in a block of at least 4 KiB whatever their length: 4.4 KB an event, 2 MB a
request, +8 MB peak RSS in bench/local_api.py. Counted with tracemalloc, which sees the allocated
block, not `len()`: deterministic, no timing. The door now sizes all the data of a request in one
serialisation and measures event by event only when the whole could be too big: the second test.
"""

from __future__ import annotations

import gc
import tracemalloc

import orjson
import pytest

from agent.core.envelope import EnvelopeEncoder
from agent.web import ApiError, EventBatch


def body(n: int) -> bytes:
    """A request like bench/local_api.py's: small events, every one with a ts and a source."""
    return orjson.dumps(
        [
            {
                "type": "app.checkin",
                "source": "tablet-1",
                "ts": f"2026-11-23T09:15:{i % 60:02d}.{i % 1000:03d}+01:00",
                "data": {"member": f"m-{i}", "lane": i % 8, "worker": 1, "n": i},
            }
            for i in range(n)
        ]
    )


def test_the_events_of_a_request_hold_hundreds_of_bytes_each_not_a_4_kib_block() -> None:
    batch = EventBatch(["app"], 5000, lambda: 1 << 28, EnvelopeEncoder("t", "s", "a"))
    request = body(500)
    batch.decode(request, ndjson=False)  # warm the timestamp cache and pydantic's first-call state
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = batch.decode(request, ndjson=False)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(events) == 500
    # an Event, its ts and its data (~60 bytes of JSON): a few hundred bytes
    assert held / len(events) < 1024, f"{held / len(events):.0f} bytes held per event"
    # and the bytes are the event's data, exactly
    envelope = EnvelopeEncoder("t", "s", "a").encode_many(
        events[:1], 1, "0" * 32, "2026-01-01T00:00:00.000Z"
    )[0]
    assert orjson.loads(envelope)["data"] == {"member": "m-0", "lane": 0, "worker": 1, "n": 0}


def test_a_batch_bigger_than_an_envelope_is_measured_event_by_event() -> None:
    """The door sizes a request's data all at once; a whole bigger than the broker's limit is not
    a refusal: each event is measured, and only the ones that cannot go are named (413)."""
    batch = EventBatch(["app"], 5000, lambda: 4096, EnvelopeEncoder("t", "s", "a"))
    small = [{"type": "app.pad", "data": {"pad": "x" * 100, "i": i}} for i in range(100)]  # 13 KB of data
    assert len(batch.decode(orjson.dumps(small), ndjson=False)) == 100
    big = [*small[:57], {"type": "app.pad", "data": {"pad": "x" * 5000}}, *small[57:]]
    with pytest.raises(ApiError) as refused:
        batch.decode(orjson.dumps(big), ndjson=False)
    assert refused.value.status == 413
    assert [e["index"] for e in refused.value.body["errors"]] == [57]
