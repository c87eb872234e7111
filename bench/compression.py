"""Which codec the buffer stores chunk bodies with: zlib against zstd, on chunks as the agent writes them.

    .venv/bin/python bench/compression.py [--rounds 5]

For each kind of chunk (500 small local-API events, one small event alone, one POS sale with its
lines, 500 traffic summaries) and each codec and level it prints the stored bytes per event, the
CPU to compress (paid on the commit path, in the writer) and to decompress (paid at send, in the
uplink), per event. Nothing is asserted; the choice and its reasons are in agent/buffer/codec.py.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core.envelope import EnvelopeEncoder, Event, UtcFormatter, Uuid7  # noqa: E402
from bench.machine import print_machine  # noqa: E402


def encode(events: list[Event]) -> bytes:
    """The chunk body the writer stores for these events (envelopes joined by commas)."""
    enc = EnvelopeEncoder("acme", "sh-0012", "till-pc-1")
    now = int(time.time() * 1000)
    return b",".join(enc.encode_many(events, 1_000_000, Uuid7().stem(now), UtcFormatter().format(now)))


def kinds() -> dict[str, tuple[bytes, int]]:
    small = [Event("app.checkin", {"member": f"m-{i % 9973}", "lane": i % 8}, "tablet-1") for i in range(500)]
    sale = Event(
        "pos.sale",
        {
            "register": "R1",
            "txn_id": "R1-000123",
            "total": 4790,
            "currency": "EUR",
            "tender": "card",
            "lines": [
                {"sku": f"40012345{i:05d}", "qty": 1 + i % 3, "price": 199 + 50 * i, "desc": f"Item {i}"}
                for i in range(6)
            ],
        },
        "pos:front-1",
    )
    traffic = [
        Event(
            "traffic.summary",
            {"zone": f"z{i % 4}", "count": i % 17, "dwell_p50_s": 31.5 + i % 9, "window_s": 60},
            "ble",
        )
        for i in range(500)
    ]
    return {
        "500 small events": (encode(small), 500),
        "1 small event": (encode(small[:1]), 1),
        "1 POS sale": (encode([sale]), 1),
        "500 traffic summaries": (encode(traffic), 500),
    }


def codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    out: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {}
    for level in (1, 3, 6):
        out[f"zlib {level}"] = (lambda b, lv=level: zlib.compress(b, lv), zlib.decompress)
    try:
        import zstandard
    except ImportError:
        print("zstandard is not installed: zstd rows left out")
        return out
    for level in (1, 3, 6):
        c = zstandard.ZstdCompressor(level=level)
        d = zstandard.ZstdDecompressor()
        out[f"zstd {level}"] = (c.compress, d.decompress)
    return out


def timed(fn: Callable[[bytes], bytes], data: bytes, rounds: int) -> tuple[bytes, float]:
    """fn(data) and its best CPU time over `rounds` runs (enough repetitions for 50 ms each)."""
    reps = 1
    while True:
        t0 = time.process_time()
        for _ in range(reps):
            out = fn(data)
        if time.process_time() - t0 > 0.05:
            break
        reps *= 4
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            out = fn(data)
        best = min(best, (time.process_time() - t0) / reps)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print_machine()
    for kind, (body, n) in kinds().items():
        print(f"{kind}: {len(body) / n:.0f} bytes/event as JSON")
        for name, (compress, decompress) in codecs().items():
            packed, c_s = timed(compress, body, args.rounds)
            unpacked, d_s = timed(decompress, packed, args.rounds)
            assert unpacked == body
            print(
                f"  {name:8} {len(packed) / n:7.1f} bytes/event  compress {c_s / n * 1e6:6.2f} us/event  "
                f"decompress {d_s / n * 1e6:6.3f} us/event"
            )


if __name__ == "__main__":
    main()
