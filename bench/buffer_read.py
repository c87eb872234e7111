"""The buffer's share of a drain, without MQTT: read a backlog oldest first and acknowledge it.

    .venv/bin/python bench/buffer_read.py [--events 1000000]

Commits `--events` small events (batches of 500) into a fresh buffer, reopens it, then reads it
as the uplink does (slices of 64 chunks, bodies decompressed) and acknowledges every chunk
(deleted by the writer), until it is empty. Prints events/s and CPU per event of the whole
process (reader and writer threads). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.buffer import Outbox, read_chunks  # noqa: E402
from bench.core import small_events  # noqa: E402
from bench.machine import print_machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        path = Path(tmp) / "buffer.db"
        with Outbox(path, tenant="bench", store="s1", agent="a1") as outbox:
            for i in range(0, args.events, 500):
                outbox.commit_sync(small_events(500, i))
        with Outbox(path, tenant="bench", store="s1", agent="a1") as outbox:
            conn = outbox.read_conn()
            cpu0, t0 = time.process_time(), time.perf_counter()
            cursor = sent = 0
            while chunks := read_chunks(conn, cursor, 64, max_bytes=64 * 256 * 1024):
                cursor = chunks[-1].seq
                for chunk in chunks:
                    outbox.acked([chunk])
                sent += sum(c.n for c in chunks)
            outbox.flush()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            print(
                f"read + ack: {sent:,} events in {wall:.2f} s: {sent / wall:,.0f} events/s, "
                f"CPU {cpu / sent * 1e6:.2f} us/event; left in buffer {outbox.count}"
            )


if __name__ == "__main__":
    main()
