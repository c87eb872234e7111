"""Fleet ingest throughput: simulated agents → mosquitto → store-agent-ingest → PostgreSQL.

    nice -n 10 .venv/bin/python bench/ingest.py [--events 300000] [--agents 40] [--publishers 4]
                                                [--instances 1 2] [--mode live|backlog]

Starts, in a temp dir, a mosquitto on a free loopback port and makes a scratch database on the
PostgreSQL at 127.0.0.1:5432 (dropped at the end). `--publishers` processes simulate `--agents`
agents between them and build their batches of 500 realistic envelopes (sales, scans, presence;
tests/support/fleet.py) before the clock starts. For each instance count:

- `live`: the ingest instances run; the publishers publish (QoS 1, 100 in flight each) and the
  clock runs from the go signal until every event is in `store_events`.
- `backlog`: the instances subscribe, stop, the publishers fill their persistent sessions, and
  the clock runs from the instances' restart until every event landed: the ingest's own rate,
  without the publishers competing for the CPU.

Prints events/s landed, the ingest processes' CPU per event (user+system from /proc/PID/stat),
their PostgreSQL backends' and mosquitto's, and the load average (the machine may be shared). Landing is polled once a second with count(*),
so a figure can be up to a second pessimistic; backends are counted from when first seen (polled
every 0.25 s). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import print_machine  # noqa: E402
from tests.support.fleet import Publisher, SimAgent  # noqa: E402
from tests.support.ingestproc import STORE_AGENT_INGEST, write_ingest_config  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.pg import scratch_database  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INGEST = (
    str(ROOT / ".venv" / "bin" / "store-agent-ingest") if (ROOT / ".venv").exists() else STORE_AGENT_INGEST
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
BATCH = 500


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def publisher(
    port: int, index: int, agents: int, batches_each: int, ready: mp.Event, go: mp.Event, done: mp.Queue
) -> None:
    """One publisher process: build every payload first, then send them all when told."""
    sims = [
        SimAgent("acme", f"s{(index * agents + i) % 97:03d}", f"p{index}-a{i}", seed=index * 1000 + i)
        for i in range(agents)
    ]
    messages = [(a.topic(), a.payload(a.events(BATCH))) for _ in range(batches_each) for a in sims]
    pub = Publisher(port, f"bench-pub-{index}", inflight=100)
    ready.set()
    go.wait()
    started = time.monotonic()
    pub.send_all(messages, timeout_s=600)
    done.put((index, time.monotonic() - started, len(messages) * BATCH))
    pub.close()


def wait_for(path: Path, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no {text!r} x{count}: {path.read_text(errors='replace')[-2000:]}")


def run_case(instances: int, mode: str, args: argparse.Namespace, work: Path) -> None:
    """One instance count and mode: its own broker and database; prints one line."""
    broker = Mosquitto(work / f"mq-{instances}-{mode}").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _run_case(instances, mode, args, work, broker, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        broker.stop()


def _run_case(
    instances: int,
    mode: str,
    args: argparse.Namespace,
    work: Path,
    broker: Mosquitto,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    import psycopg

    with scratch_database("ingest_bench") as dsn:
        configs = [
            write_ingest_config(
                work / f"i{n}-{instances}-{mode}.toml",
                broker.port,
                dsn,
                f"bench-ingest-{n}",
                batch_wait_ms=50,
            )
            for n in range(instances)
        ]
        logs = [c.with_suffix(".log") for c in configs]

        def start_all() -> None:
            procs.clear()
            for config, log in zip(configs, logs, strict=True):
                with open(log, "ab") as fh:
                    procs.append(
                        subprocess.Popen([INGEST, "run", "--config", str(config)], stdout=fh, stderr=fh)
                    )

        start_all()
        for log in logs:
            wait_for(log, 'msg="subscribed to ', 1)
        per_pub = args.agents // args.publishers
        batches_each = max(1, args.events // (BATCH * args.agents))
        total = batches_each * per_pub * args.publishers * BATCH
        ready = [mp.Event() for _ in range(args.publishers)]
        go = mp.Event()
        done: mp.Queue = mp.Queue()
        pubs = [
            mp.Process(
                target=publisher,
                args=(broker.port, i, per_pub, batches_each, ready[i], go, done),
                daemon=True,
            )
            for i in range(args.publishers)
        ]
        for p in pubs:
            p.start()
        for r in ready:
            r.wait(600)
        if mode == "backlog":
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            go.set()
            for _ in pubs:
                done.get(timeout=600)
            start_all()
        with psycopg.connect(dsn, autocommit=True) as conn:
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
            assert broker.proc is not None
            broker_cpu0 = cpu_seconds(broker.proc.pid)
            started = time.monotonic()
            go.set()
            backends: dict[int, float] = {}
            landed = 0
            tick = 0
            while landed < total and time.monotonic() - started < 600:
                time.sleep(0.25)
                tick += 1
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'store-agent-ingest%'"
                ).fetchall():
                    backends.setdefault(pid, cpu_seconds(pid))
                backend_cpu = {pid: cpu_seconds(pid) for pid in backends}
                if tick % 4 == 0:
                    landed = conn.execute("SELECT count(*) FROM ingest_event_ids").fetchone()[0]  # type: ignore[index]
            elapsed = time.monotonic() - started
            ingest_cpu = sum(cpu_seconds(p.pid) - cpu0[p.pid] for p in procs)
            broker_cpu = cpu_seconds(broker.proc.pid) - broker_cpu0
            pg_cpu = sum(backend_cpu[pid] - backends[pid] for pid in backends)
            rows = conn.execute("SELECT count(*), count(DISTINCT id) FROM store_events").fetchone()
        pub_rate = []
        while not done.empty():
            _, secs, n = done.get()
            pub_rate.append(n / secs)
        for p in pubs:
            p.join(30)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        broker.stop()
        print(
            f"{mode:7s} instances={instances} events={total} landed={rows[0]} distinct={rows[1]} "  # type: ignore[index]
            f"in {elapsed:.1f} s: {landed / elapsed:,.0f} events/s; ingest CPU {ingest_cpu / landed * 1e6:.1f} µs/event"
            f" ({ingest_cpu / elapsed * 100:.0f}% of a core), PostgreSQL backends {pg_cpu / landed * 1e6:.1f} µs/event"
            f" ({pg_cpu / elapsed * 100:.0f}%), mosquitto {broker_cpu / landed * 1e6:.1f} µs/event"
            f" ({broker_cpu / elapsed * 100:.0f}%); load average {os.getloadavg()[0]:.1f}"
            + f" [{len(backends)} backends]"
            + (f"; publishers {sum(pub_rate):,.0f} events/s" if pub_rate and mode == "live" else ""),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--agents", type=int, default=40)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mode", choices=["live", "backlog"], nargs="+", default=["backlog", "live"])
    args = parser.parse_args()
    print_machine()
    print(
        f"batches of {BATCH} envelopes, {args.agents} agents in {args.publishers} publisher processes",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for mode in args.mode:
            for n in args.instances:
                run_case(n, mode, args, Path(tmp))


if __name__ == "__main__":
    main()
