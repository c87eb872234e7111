"""Benchmarks of the durable core (issue 3): numbers printed, nothing asserted.

    .venv/bin/python bench/core.py ingest [--events 500000]     durable ingest, batches of 500
    .venv/bin/python bench/core.py drain  [--events 1000000]    a backlog to a local mosquitto, QoS 1
    .venv/bin/python bench/core.py latency [--rate 1000 --seconds 20]   commit -> subscriber, online
    .venv/bin/python bench/core.py idle   [--seconds 30]        idle RSS and CPU of the agent
    .venv/bin/python bench/core.py size   [--events 100000]     bytes of buffer per small event
    .venv/bin/python bench/core.py backlog [--events 1000000] [--fill api|direct]
                                  an offline backlog, then the broker back: RSS, drain, WAL, disk
    .venv/bin/python bench/core.py startup [--events 5000000] [--data DIR]
                                  process start -> READY=1 / API answering, out of cache (root)
    .venv/bin/python bench/core.py all

Each prints wall figures and the agent's CPU time per event (user + system of its process, from
/proc), which is steady where wall time is not on a busy 2-core machine. The agent runs as
`store-agent run` in a subprocess, the broker is a mosquitto on a free loopback port and the
subscriber a separate process, so neither is counted as the agent's CPU.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.buffer import Outbox  # noqa: E402
from agent.buffer.footprint import data_dir_bytes  # noqa: E402
from agent.config import load as load_config  # noqa: E402
from agent.core.envelope import Event  # noqa: E402
from bench.local_api import client as api_client  # noqa: E402
from bench.local_api import cpu_seconds, memory_mb, subscriber  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from tests.support.agentproc import STORE_AGENT  # noqa: E402
from tests.support.mosquitto import Mosquitto, free_port  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

TOKEN = "bench-token-0123456789"


def small_events(n: int, start: int = 0) -> list[Event]:
    return [
        Event("app.checkin", {"member": f"m-{(start + i) % 9973}", "lane": i % 8}, "tablet-1")
        for i in range(n)
    ]


def write_config(
    work: Path,
    broker_port: int | None,
    api_port: int,
    *,
    data: Path | None = None,
    max_bytes: int = 1 << 30,
    log_level: str = "warning",
) -> Path:
    (work / "token").write_text(TOKEN + "\n")
    mqtt = f'host = "127.0.0.1"\nport = {broker_port}\ntls = false\n' if broker_port else ""
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\ntenant = "bench"\nstore = "s1"\nid = "a1"\ndata_dir = "{data or work / "data"}"\n'
        f"[mqtt]\n{mqtt}"
        f'[local_api]\nlisten = "127.0.0.1:{api_port}"\ntoken_file = "{work / "token"}"\n'
        f"[buffer]\nmax_bytes = {max_bytes}\n"
        f'[log]\nlevel = "{log_level}"\n'
    )
    return config


def start_agent(config: Path, work: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = open(work / "agent.log", "ab")
    return subprocess.Popen(
        [STORE_AGENT, "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
    )


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
        except OSError:
            continue
        todo += children.get(p, [])
    return total


class Sampler:
    """Samples the agent's RSS and the data_dir's WAL and total size every `every` seconds."""

    def __init__(self, pid: int, data: Path, every: float = 0.2) -> None:
        self.pid, self.data, self.every = pid, data, every
        self.wal_max = self.dir_max = 0
        self.rss_max = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wal = self.data / "buffer.db-wal"
        while not self._stop.is_set():
            try:
                self.wal_max = max(self.wal_max, wal.stat().st_size if wal.exists() else 0)
                self.dir_max = max(self.dir_max, data_dir_bytes(self.data))
                self.rss_max = max(self.rss_max, memory_mb(self.pid, "VmRSS"))
            except OSError:
                pass
            self._stop.wait(self.every)

    def reset(self) -> None:
        self.wal_max = self.dir_max = 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wal_bytes(data: Path) -> int:
    wal = data / "buffer.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def drop_caches() -> bool:
    """Drop the page cache (root only), so the buffer file is read from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def prefill_direct(data: Path, n: int, max_bytes: int = 1 << 30) -> None:
    outbox = Outbox(data / "buffer.db", tenant="bench", store="s1", agent="a1", max_bytes=max_bytes).start()
    for i in range(0, n, 500):
        outbox.commit_sync(small_events(min(500, n - i), i))
    outbox.close()


def api_get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return orjson.loads(conn.getresponse().read())
    finally:
        conn.close()


def api_post(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path, b"", {"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """`wait_until`, where an agent that does not answer yet (or answers without the field) counts as not yet."""

    def answered() -> bool:
        try:
            return bool(predicate())
        except (OSError, ValueError, KeyError):
            return False

    return wait_until(answered, timeout, interval)


def stop(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    try:
        agent.wait(20)
    except subprocess.TimeoutExpired:
        agent.kill()


def bench_ingest(args: argparse.Namespace) -> None:
    """Durable group commit from 4 threads, batches of 500, fsync'd (synchronous=FULL)."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        outbox = Outbox(Path(tmp) / "buffer.db", tenant="bench", store="s1", agent="a1").start()
        per_thread = args.events // 4
        batches = [
            [small_events(500, t * per_thread + i) for i in range(0, per_thread, 500)] for t in range(4)
        ]
        cpu0, t0 = time.process_time(), time.perf_counter()

        def work(mine: list[list[Event]]) -> None:
            for batch in mine:
                outbox.commit_sync(batch)

        threads = [threading.Thread(target=work, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        outbox.close()
        n = per_thread * 4
        print(
            f"ingest: {n:,} events in batches of 500 from 4 threads: {n / wall:,.0f} events/s durable; "
            f"CPU {cpu / n * 1e6:.2f} us/event"
        )


def bench_drain(args: argparse.Namespace) -> None:
    """A backlog committed while offline, then the agent drains it to a local mosquitto."""
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        api_port = free_port()
        config = write_config(work, broker.port, api_port)
        with Outbox.from_config(load_config(config)) as outbox:  # the agent's own buffer, as it will open it
            for i in range(0, args.events, 500):
                outbox.commit_sync(small_events(500, i))
        size_mb = sum(p.stat().st_size for p in (work / "data").iterdir()) / 1e6
        ctx = mp.get_context("spawn")
        expected = ctx.Value("q", args.events)
        ready = ctx.Event()
        result: mp.Queue = ctx.Queue()
        sub = ctx.Process(
            target=subscriber, args=(broker.port, "retail/bench/s1/a1/up/#", expected, ready, result)
        )
        sub.start()
        ready.wait(10)
        agent = start_agent(config, work)
        try:
            t0 = time.time()
            cpu0 = 0.0
            report = result.get(timeout=900)
            wall = report["last"] - t0
            cpu = cpu_seconds(agent.pid) - cpu0
            peak = memory_mb(agent.pid)
            wait_for(lambda: api_get(api_port, "/v1/status")["buffer"]["events"] == 0, 30)
            left = api_get(api_port, "/v1/status")["buffer"]["events"]
        finally:
            stop(agent)
            sub.join(5)
            broker.stop()
        print(
            f"drain: {args.events:,} buffered events ({size_mb:.0f} MB on disk) to mosquitto at QoS 1: "
            f"{report['distinct'] / wall:,.0f} events/s (start-up included, {wall:.1f} s); "
            f"agent CPU {cpu / args.events * 1e6:.2f} us/event (start-up included); peak RSS {peak:.1f} MB; "
            f"received {report['distinct']:,} distinct, {report['duplicates']} duplicates; left in buffer {left}"
        )


def latency_subscriber(port: int, topic: str, ready, result, seconds: float) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    latencies: list[float] = []

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        now = time.time()
        for e in orjson.loads(msg.payload)["events"]:
            latencies.append(now - e["data"]["t0"])

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-latency", protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port, 60)
    client.loop_start()  # paho's own thread reads every packet as it comes (loop() takes one a call)
    time.sleep(seconds + 10)
    client.loop_stop()
    result.put(latencies)


def bench_latency(args: argparse.Namespace) -> None:
    """Events posted one at a time at `rate`/s; latency = received upstream - before the POST."""
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        result: mp.Queue = ctx.Queue()
        sub = ctx.Process(
            target=latency_subscriber,
            args=(broker.port, "retail/bench/s1/a1/up/#", ready, result, args.seconds),
        )
        sub.start()
        ready.wait(10)
        api_port = free_port()
        agent = start_agent(write_config(work, broker.port, api_port), work)
        try:
            wait_for(lambda: api_get(api_port, "/healthz")["mqtt"]["connected"], 20)
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            counts = [0] * args.clients
            cpu0 = cpu_seconds(agent.pid)
            start = time.perf_counter()

            def client(k: int) -> None:
                # each client sends one event a request at rate/clients, like many store apps at once
                conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
                interval = args.clients / args.rate
                while time.perf_counter() - start < args.seconds:
                    due = start + (k / args.clients + counts[k]) * interval
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    body = orjson.dumps(
                        [{"type": "app.ping", "data": {"t0": time.time(), "c": k, "n": counts[k]}}]
                    )
                    conn.request("POST", "/v1/events", body, headers)
                    conn.getresponse().read()
                    counts[k] += 1

            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sent = sum(counts)
            achieved = sent / (time.perf_counter() - start)
            cpu = cpu_seconds(agent.pid) - cpu0
            latencies = sorted(result.get(timeout=60))
        finally:
            stop(agent)
            sub.join(5)
            broker.stop()
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
        print(
            f"latency: {sent:,} events posted one per request by {args.clients} clients at {achieved:,.0f}/s; commit->subscriber "
            f"(from before the POST) p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms; "
            f"received {len(latencies):,}; agent CPU {cpu / max(sent, 1) * 1e6:.1f} us/event at one event a request"
        )


def bench_idle(args: argparse.Namespace) -> None:
    """The agent connected, nothing happening: RSS and CPU share."""
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        api_port = free_port()
        agent = start_agent(write_config(work, broker.port, api_port), work)
        try:
            wait_for(lambda: api_get(api_port, "/healthz")["mqtt"]["connected"], 20)
            time.sleep(3)
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu, wall = cpu_seconds(agent.pid) - cpu0, time.monotonic() - t0
            rss = memory_mb(agent.pid, "VmRSS")
        finally:
            stop(agent)
            broker.stop()
        print(f"idle: RSS {rss:.1f} MB; CPU {cpu / wall * 100:.2f} % of one core over {wall:.0f} s")


def bench_size(args: argparse.Namespace) -> None:
    """Bytes of buffer (database + WAL) per small event, batched and one by one."""
    for label, per_commit in (("batches of 500", 500), ("one event a commit", 1)):
        with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
            outbox = Outbox(
                Path(tmp) / "buffer.db", tenant="acme", store="sh-0012", agent="till-pc-1"
            ).start()
            n = args.events if per_commit > 1 else min(args.events, 20_000)
            for i in range(0, n, per_commit):
                outbox.commit_sync(small_events(per_commit, i))
            body = outbox.bytes / n
            outbox.close()
            size = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.name.startswith("buffer.db"))
            print(
                f"size: {n:,} small events ({label}): {size / n:.0f} bytes of buffer file per event "
                f"(envelope + row {body:.0f} bytes)"
            )


def fill_api(api_port: int, n: int, clients: int = 4) -> float:
    """Post `n` events through the local API (batches of 500 from `clients` processes); returns the wall time."""
    ctx = mp.get_context("spawn")
    ready, start, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    per = n // clients
    procs = [
        ctx.Process(target=api_client, args=(api_port, per, 500, w, ready, start, results))
        for w in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    t0 = time.perf_counter()
    start.set()
    accepted = sum(results.get(timeout=1800)["accepted"] for _ in procs)
    wall = time.perf_counter() - t0
    for proc in procs:
        proc.join(10)
    if accepted != per * clients:
        print(f"  (only {accepted:,} of {per * clients:,} accepted)")
    return wall


def bench_backlog(args: argparse.Namespace) -> None:
    """An offline backlog (through the local API with the broker down, or prefilled), then the broker back."""
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        work = Path(tmp)
        data = work / "data"
        broker = Mosquitto(work / "mosquitto")
        # hold the broker's port while it is down (bound, not listening: connections are refused),
        # so nothing else takes it during a long fill
        holder = socket.socket()
        holder.bind(("127.0.0.1", broker.port))
        n = args.events // 4 * 4 if args.fill == "api" else args.events
        if args.fill == "direct":
            prefill_direct(data, n, args.max_bytes)
        api_port = free_port()
        agent = start_agent(write_config(work, broker.port, api_port, max_bytes=args.max_bytes), work)
        sampler = Sampler(agent.pid, data)
        try:
            wait_for(lambda: api_get(api_port, "/healthz") is not None, 120)
            fill_cpu = tree_cpu_seconds(agent.pid)
            fill_wall = 0.0
            if args.fill == "api":
                fill_wall = fill_api(api_port, n)
                fill_cpu = tree_cpu_seconds(agent.pid) - fill_cpu
            wait_for(lambda: api_get(api_port, "/v1/status")["buffer"]["events"] >= n, 10)
            n = api_get(api_port, "/v1/status")["buffer"]["events"]  # fewer if the cap refused some
            before_dir, before_wal, fill_wal_max = data_dir_bytes(data), wal_bytes(data), sampler.wal_max
            fill_dir_max = sampler.dir_max
            sampler.reset()
            ctx = mp.get_context("spawn")
            expected, ready, result = ctx.Value("q", n), ctx.Event(), ctx.Queue()
            # the agent is frozen until the subscriber is in place: it finds a broker that is back
            # within seconds, and what it sent before anybody subscribed would reach no one
            os.kill(agent.pid, signal.SIGSTOP)
            holder.close()
            broker.start()
            sub = ctx.Process(
                target=subscriber, args=(broker.port, "retail/bench/s1/a1/up/#", expected, ready, result)
            )
            sub.start()
            ready.wait(10)
            os.kill(agent.pid, signal.SIGCONT)
            cpu0, t0 = tree_cpu_seconds(agent.pid), time.time()
            api_post(api_port, "/v1/drain")  # try the broker now, not after the rest of the backoff
            report = result.get(timeout=1800)
            wall = report["last"] - t0
            wait_for(lambda: api_get(api_port, "/v1/status")["buffer"]["events"] == 0, 60)
            drain_cpu = tree_cpu_seconds(agent.pid) - cpu0
            left = api_get(api_port, "/v1/status")["buffer"]["events"]
            time.sleep(2)  # the writer's last groups, and the truncation on drain
            after_dir, after_wal = data_dir_bytes(data), wal_bytes(data)
            peak = memory_mb(agent.pid)
            drain_wal_max, drain_dir_max = sampler.wal_max, sampler.dir_max
        finally:
            sampler.stop()
            stop(agent)
            sub_proc = locals().get("sub")
            if sub_proc is not None:
                sub_proc.join(5)
            broker.stop()
        mb = 1e6
        fill = (
            f"{n / fill_wall:,.0f} events/s through the local API, agent CPU {fill_cpu / n * 1e6:.2f} us/event"
            if args.fill == "api"
            else "prefilled"
        )
        print(
            f"backlog {n:,} ({args.fill}, max_bytes {args.max_bytes:,}): fill {fill}; WAL max {fill_wal_max / mb:.1f} MB, data_dir max "
            f"{fill_dir_max / mb:.1f} MB during the fill"
        )
        print(
            f"  before the drain: data_dir {before_dir / mb:.1f} MB ({before_dir / n:.0f} B on disk per event), "
            f"WAL {before_wal / mb:.1f} MB"
        )
        print(
            f"  drain: {report['distinct'] / wall:,.0f} events/s ({wall:.1f} s, broker start to last event), "
            f"agent CPU {drain_cpu / n * 1e6:.2f} us/event; received {report['distinct']:,} distinct, "
            f"{report['duplicates']} duplicates, {left} left in the buffer; during: WAL max {drain_wal_max / mb:.1f} MB, data_dir max "
            f"{drain_dir_max / mb:.1f} MB"
        )
        print(
            f"  after the drain: WAL {after_wal / mb:.2f} MB, data_dir {after_dir / mb:.1f} MB; "
            f"agent peak RSS over the whole run {peak:.1f} MB (VmHWM; sampled max {sampler.rss_max:.1f} MB)"
        )


def ready_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def time_startup(config: Path, work: Path, api_port: int, cold: bool) -> tuple[float, float, bool]:
    """(s to READY=1, s to the API answering, whether the full check ran) for one start."""
    dropped = drop_caches() if cold else False
    notify = work / "notify.sock"
    notify.unlink(missing_ok=True)
    sock = ready_listener(notify)
    log_before = (work / "agent.log").stat().st_size if (work / "agent.log").exists() else 0
    t0 = time.monotonic()
    agent = start_agent(config, work, {"NOTIFY_SOCKET": str(notify)})
    ready_s = api_s = float("nan")
    try:
        sock.settimeout(120)
        while True:
            if b"READY=1" in sock.recv(4096):
                ready_s = time.monotonic() - t0
                break
        wait_for(lambda: api_get(api_port, "/healthz") is not None, 60, interval=0.005)
        api_s = time.monotonic() - t0
    finally:
        sock.close()
        stop(agent)
    with open(work / "agent.log", "rb") as fh:
        fh.seek(log_before)
        checked = b"quick_check" in fh.read()
    if cold and not dropped:
        print("  (not root: caches not dropped, the file was read from memory)")
    return ready_s, api_s, checked


def bench_startup(args: argparse.Namespace) -> None:
    """Start-up with a big buffer: after a clean stop (no full check) and after kill -9 (full check)."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else work / "data"
        if not (data / "buffer.db").exists():
            prefill_direct(data, args.events, args.max_bytes)
        size = data_dir_bytes(data)
        api_port = free_port()
        config = write_config(work, None, api_port, data=data, max_bytes=args.max_bytes, log_level="info")
        clean = time_startup(config, work, api_port, cold=True)
        # an unclean stop: kill -9 of a running agent, then a start out of cache
        agent = start_agent(config, work)
        wait_for(lambda: api_get(api_port, "/healthz") is not None, 120)
        agent.kill()
        agent.wait()
        unclean = time_startup(config, work, api_port, cold=True)
        for label, (ready_s, api_s, checked) in (("after a clean stop", clean), ("after kill -9", unclean)):
            print(
                f"startup: buffer of {args.events:,} events ({size / 1e6:.0f} MB), out of cache, {label}: "
                f"READY=1 after {ready_s:.2f} s, API answering after {api_s:.2f} s; "
                f"full quick_check {'ran' if checked else 'skipped'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "what", choices=["ingest", "drain", "latency", "idle", "size", "backlog", "startup", "all"]
    )
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fill", choices=["api", "direct"], default="api", help="backlog: how it is made")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="backlog, startup: [buffer] max_bytes")
    parser.add_argument("--data", help="startup: a data_dir to reuse (filled on the first run)")
    args = parser.parse_args()
    print_machine()
    defaults = {
        "ingest": 500_000,
        "drain": 1_000_000,
        "size": 100_000,
        "backlog": 1_000_000,
        "startup": 5_000_000,
    }
    todo = ["ingest", "size", "idle", "latency", "drain"] if args.what == "all" else [args.what]
    events = args.events
    for what in todo:
        args.events = events or defaults.get(what, 0)
        globals()[f"bench_{what}"](args)
        sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
