"""The ingest's PostgreSQL side alone: one `ingest.db.Writer` landing batches, and storage per event.

    nice -n 10 .venv/bin/python bench/ingest_db.py [--batches 15] [--agents 40]

Builds `--batches` batches of 500 realistic envelopes from each of `--agents` simulated agents
(tests/support/fleet.py) in memory, then lands them with one Writer into a scratch database on
127.0.0.1:5432 (dropped at the end): first every batch new (the fast path), then the same
batches again (every id a duplicate: the staging path), then new batches that each carry one
event already landed (the staging path with new rows). Prints events/s, the backend's CPU per
event (/proc/PID/stat) and the bytes per event of heap, indexes and the id ledger.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.ingest import cpu_seconds  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from ingest.db import Writer  # noqa: E402
from ingest.envelope import Parsed, parse_message  # noqa: E402
from tests.support.fleet import SimAgent  # noqa: E402
from tests.support.pg import scratch_database  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--agents", type=int, default=40)
    args = parser.parse_args()
    print_machine()
    agents = [SimAgent("acme", f"s{i}", f"a{i}", seed=i) for i in range(args.agents)]

    def make() -> list[Parsed]:
        made = []
        for _ in range(args.batches):
            out = Parsed()
            for a in agents:
                parse_message(a.topic(), a.payload(a.events(500)), "retail", "2026-12-08T00:00:00+00:00", out)
            made.append(out)
        return made

    batches = make()
    # new events, but each batch carries one copy of an event already landed: the staging path
    mixed = make()
    for out, old in zip(mixed, batches, strict=True):
        first_id = next(iter(old.rows))
        out.rows[first_id] = old.rows[first_id]
    with scratch_database("ingest_bench") as dsn:
        writer = Writer(dsn)
        writer.open()
        assert writer.conn is not None
        pid = writer.conn.info.backend_pid
        cases = [
            ("new ids (fast path)", batches),
            ("all duplicates (staging path)", batches),
            ("new ids but one duplicate a batch (staging path)", mixed),
        ]
        for label, runs in cases:
            cpu0, started, n, landed = cpu_seconds(pid), time.perf_counter(), 0, 0
            for out in runs:
                landed += writer.write(out.rows, out.days, out.rejects)
                n += len(out.rows)
            elapsed = time.perf_counter() - started
            print(
                f"{label}: {n} events in batches of {len(batches[0].rows)}, {landed} landed, "
                f"{n / elapsed:,.0f} events/s; backend CPU {(cpu_seconds(pid) - cpu0) / n * 1e6:.1f} µs/event",
                flush=True,
            )
        writer.close()
        with psycopg.connect(dsn) as conn:
            heap, indexes = conn.execute(
                "SELECT sum(pg_table_size(inhrelid)), sum(pg_indexes_size(inhrelid)) FROM pg_inherits "
                "WHERE inhparent = 'ingest_events'::regclass"
            ).fetchone()  # type: ignore[misc]
            ledger = conn.execute("SELECT pg_total_relation_size('ingest_event_ids')").fetchone()[0]  # type: ignore[index]
            n = conn.execute("SELECT count(*) FROM ingest_events").fetchone()[0]  # type: ignore[index]
        print(
            f"storage per event: heap+toast {heap / n:.0f} B, indexes {indexes / n:.0f} B, id ledger {ledger / n:.0f} B"
        )


if __name__ == "__main__":
    main()
