"""End-to-end throughput of the local event API: HTTP in, SQLite buffer, MQTT out (QoS 1).

    /work/main/.venv/bin/python bench/local_api.py [--events 1000000] [--batch 500] [--clients 4]

Starts, in a temp dir, a mosquitto on a free loopback port, `store-agent run` as a subprocess
with its own config and data dir, and a subscriber in a separate process that counts distinct
event ids. Then `--clients` client processes post `--events` events in batches of `--batch`
over keep-alive connections. Prints end-to-end events/s (first request to last event received
upstream), p50/p99 request latency, the agent's peak RSS (VmHWM), the agent's CPU microseconds
per event (user+system of all its processes from /proc/PID/stat, before and after), duplicates
and lost events. The machine line (CPU model, cores) comes first.
Numbers only; nothing is asserted. The client and subscriber load runs in other processes, so
it is not counted as agent CPU; clients make their request bodies before the clock starts. The
agent's CPU is also split by thread (names from `py-spy dump` when py-spy is installed), and
`--py-spy FILE` samples the agent during the run (collapsed stacks).
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.child import stop  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from tests.support.agentproc import STORE_AGENT  # noqa: E402
from tests.support.mosquitto import Mosquitto, free_port  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of every live process under it, from /proc/PID/stat.

    Children that have ended and were waited for count in the parent's cutime/cstime, which are
    added too: the agent's CPU is all of its processes'.
    """
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (
            int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if p == pid else 0)
        ) / CLK_TCK
    return total


def descendants(pid: int) -> list[int]:
    """The live processes under `pid` (children, grandchildren, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from `py-spy dump` when it is installed."""
    spy = ROOT / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        return {}
    try:
        text = subprocess.run(
            [str(spy), "dump", "-p", str(pid)], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m[1]): m[2] for m in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', text, re.M)}


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of a process from /proc/PID/status (VmHWM: peak RSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def subscriber(port: int, topic: str, expected: Any, ready: Any, result: Any) -> None:
    """Count distinct event ids under `topic` until `expected` (set later) is reached or 120 s pass idle."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: set[str] = set()
    state = {"dupes": 0, "last": 0.0, "msgs": 0}

    def on_connect(client, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
        client.subscribe(topic, qos=1)

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        events = orjson.loads(msg.payload)["events"]
        before = len(seen)
        seen.update(e["id"] for e in events)
        state["dupes"] += len(events) - (len(seen) - before)
        state["msgs"] += 1
        state["last"] = time.time()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-subscriber", protocol=mqtt.MQTTv311)
    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port, 60)
    idle_since = time.monotonic()
    count = 0
    while True:
        client.loop(0.05)
        if len(seen) != count:
            count = len(seen)
            idle_since = time.monotonic()
        target = expected.value
        if target >= 0 and count >= target:
            break
        if time.monotonic() - idle_since > (30 if target >= 0 else 120):
            break
    client.disconnect()
    result.put(
        {
            "distinct": len(seen),
            "duplicates": state["dupes"],
            "last": state["last"],
            "messages": state["msgs"],
        }
    )


def make_bodies(n_events: int, batch: int, worker: int) -> list[bytes]:
    """The request bodies of one client: distinct events (worker, n), made before the clock starts."""
    bodies = []
    for sent in range(0, n_events, batch):
        size = min(batch, n_events - sent)
        bodies.append(
            orjson.dumps(
                [
                    {
                        "type": "app.checkin",
                        "source": f"tablet-{worker}",
                        "ts": f"2026-11-23T09:{(sent + i) // 60 % 60:02d}:{(sent + i) % 60:02d}.{i % 1000:03d}+01:00",
                        "data": {
                            "member": f"m-{(sent + i) % 9973}",
                            "lane": i % 8,
                            "worker": worker,
                            "n": sent + i,
                        },
                    }
                    for i in range(size)
                ]
            )
        )
    return bodies


def client(port: int, n_events: int, batch: int, worker: int, ready: Any, start: Any, result: Any) -> None:
    """Post `n_events` in batches over one keep-alive connection; report latencies and accepted count."""
    bodies = make_bodies(n_events, batch, worker)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    accepted = 0
    failures = 0
    ready.release()
    start.wait()
    for body in bodies:
        while True:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/events", body, headers)
            response = conn.getresponse()
            answer = response.read()
            latencies.append(time.perf_counter() - t0)
            if response.status == 200:
                accepted += orjson.loads(answer)["accepted"]
                break
            failures += 1
            if failures > 100:
                break
            time.sleep(0.05)
    conn.close()
    result.put({"accepted": accepted, "latencies": latencies, "failures": failures})


def wait_healthy(port: int, timeout: float = 20.0) -> None:
    def healthy() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            body = orjson.loads(conn.getresponse().read())
            conn.close()
            return bool(body.get("ok") and body["mqtt"]["connected"])
        except (OSError, ValueError):
            return False

    if not wait_until(healthy, timeout, interval=0.05):
        raise RuntimeError("the agent did not become healthy and connected")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--py-spy", metavar="FILE", help="also sample the agent with py-spy (collapsed stacks)"
    )
    args = parser.parse_args()
    print_machine()

    with tempfile.TemporaryDirectory(prefix="bench-local-api-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        api_port = free_port()
        (work / "token").write_text(TOKEN + "\n")
        config = work / "agent.toml"
        config.write_text(
            f'[agent]\ntenant = "bench"\nstore = "s1"\nid = "a1"\ndata_dir = "{work / "data"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntls = false\n'
            f'[local_api]\nlisten = "127.0.0.1:{api_port}"\ntoken_file = "{work / "token"}"\n'
            '[log]\nlevel = "warning"\n'
        )
        ctx = mp.get_context("spawn")
        expected = ctx.Value("q", -1)
        ready, go = ctx.Event(), ctx.Event()
        sub_result: mp.Queue = ctx.Queue()
        sub = ctx.Process(
            target=subscriber, args=(broker.port, "retail/bench/s1/a1/up/#", expected, ready, sub_result)
        )
        sub.start()
        if not ready.wait(10):
            raise RuntimeError("subscriber did not subscribe")
        agent_log = open(work / "agent.log", "wb")
        agent = subprocess.Popen(
            [STORE_AGENT, "run", "--config", str(config)], stdout=agent_log, stderr=agent_log
        )
        try:
            wait_healthy(api_port)
            rss_idle = memory_mb(agent.pid, "VmRSS")
            results: mp.Queue = ctx.Queue()
            per_client = [
                args.events // args.clients + (1 if i < args.events % args.clients else 0)
                for i in range(args.clients)
            ]
            made = ctx.Semaphore(0)
            clients = [
                ctx.Process(target=client, args=(api_port, n, args.batch, i, made, go, results))
                for i, n in enumerate(per_client)
            ]
            for c in clients:
                c.start()
            for _ in clients:  # every client has made its bodies before the clock starts
                if not made.acquire(timeout=300):
                    raise RuntimeError("a client did not get ready")
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [
                        str(ROOT / ".venv" / "bin" / "py-spy"),
                        "record",
                        "-p",
                        str(agent.pid),
                        "-f",
                        "raw",
                        "-o",
                        args.py_spy,
                        "-r",
                        "250",
                        "--threads",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            cpu0 = cpu_seconds(agent.pid)
            threads0 = thread_cpu(agent.pid)
            t0 = time.time()
            go.set()
            reports = [results.get(timeout=600) for _ in clients]
            t_posted = time.time()
            for c in clients:
                c.join()
            accepted = sum(r["accepted"] for r in reports)
            expected.value = accepted
            sub_report = sub_result.get(timeout=600)
            cpu1 = cpu_seconds(agent.pid)
            threads1 = thread_cpu(agent.pid)
            rss = memory_mb(agent.pid)
            rss_end = memory_mb(agent.pid, "VmRSS")
            names = thread_names(agent.pid)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
        finally:
            stop(agent, 15)
            sub.join(5)
            if sub.is_alive():
                sub.kill()
            broker.stop()
            agent_log.close()

        latencies = sorted(x for r in reports for x in r["latencies"])
        failures = sum(r["failures"] for r in reports)
        t_end = max(sub_report["last"], t_posted)
        elapsed = t_end - t0
        lost = accepted - sub_report["distinct"]
        cpu_us = (cpu1 - cpu0) * 1e6 / max(1, accepted)
        print(
            f"events: {accepted} accepted of {args.events} ({failures} non-200 answers), "
            f"batches of {args.batch}, {args.clients} clients"
        )
        print(
            f"end to end: {accepted / elapsed:,.0f} events/s ({elapsed:.2f} s; all posted after "
            f"{t_posted - t0:.2f} s)"
        )
        print(
            f"request latency: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
            f"p99 {latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000:.1f} ms "
            f"({len(latencies)} requests)"
        )
        print(f"agent CPU: {cpu_us:.2f} us/event ({cpu1 - cpu0:.2f} s user+sys)")
        per_event = 1e6 / max(1, accepted)
        split = []
        for tid, (user, system) in threads1.items():
            user0, system0 = threads0.get(tid, (0.0, 0.0))
            split.append(
                (
                    user - user0 + system - system0,
                    user - user0,
                    system - system0,
                    names.get(tid, f"thread {tid}"),
                )
            )
        print(
            "agent CPU by thread (us/event, user+sys): "
            + ", ".join(
                f"{name} {cpu * per_event:.2f} ({user * per_event:.2f}+{system * per_event:.2f})"
                for cpu, user, system, name in sorted(split, reverse=True)
                if cpu > 0
            )
        )
        print(
            f"agent peak RSS (VmHWM): {rss:.1f} MB (RSS {rss_idle:.1f} MB idle before, {rss_end:.1f} MB at the end)"
        )
        print(
            f"upstream: {sub_report['distinct']} distinct events in {sub_report['messages']} messages, "
            f"duplicates {sub_report['duplicates']}, lost {lost}"
        )


if __name__ == "__main__":
    main()
