"""POS frame-to-ACK latency over a pty against the real agent (`store-agent run`).

    /work/main/.venv/bin/python bench/pos_latency.py [--rate 100] [--seconds 10] [--no-broker]
                                                     [--data-dir DIR]

Starts the agent as a child process on a fresh pty (the bench holds the master and plays the
POS, stop-and-wait as a till does) with a local mosquitto (unless --no-broker: then events only
buffer), sends `--rate` transactions a second for `--seconds`, and prints frame-to-ACK latency
(p50/p99/max, from the last byte written to the ACK read) and the agent's CPU time per frame
(user+sys from /proc/PID/stat over the run, uplink and SQLite included). Every ACK is a commit
fsync'd to `--data-dir` (a tmp directory by default: say where it lives when you quote numbers).
Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from agent.protocols.stxetx import ACK, NAK, encode_frame  # noqa: E402
from bench.child import cpu_seconds, stop  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from tests.support.agentproc import STORE_AGENT as AGENT  # noqa: E402


def payload(n: int) -> bytes:
    """A typical three-item sale (about 450 bytes)."""
    return orjson.dumps(
        {
            "txn_id": f"B-{os.getpid()}-{n:07d}",
            "register": "B1",
            "ts": "2026-11-23T16:15:02+08:00",
            "kind": "sale",
            "total": "31.50",
            "currency": "CNY",
            "member_id": "M000123456",
            "items": [
                {"gtin": "06901234567892", "name": "矿泉水 550ml", "qty": 2, "unit_price": "2.00"},
                {"gtin": "06920202888883", "name": "绿茶 500ml", "qty": 3, "unit_price": "3.50"},
                {"gtin": "06903148144637", "name": "洗发水 400ml", "qty": 1, "unit_price": "17.00"},
            ],
        }
    )


def exchange(master: int, frame: bytes, timeout: float) -> tuple[int | None, float]:
    """Write a frame, wait for its answer; (answer, seconds from last byte written to answer)."""
    with_view = memoryview(frame)
    while with_view:
        select.select([], [master], [], timeout)
        try:
            with_view = with_view[os.write(master, with_view) :]
        except BlockingIOError:
            pass
    sent = time.perf_counter()
    deadline = sent + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([master], [], [], left)[0]:
            return None, time.perf_counter() - sent
        try:
            data = os.read(master, 64)
        except BlockingIOError:
            continue
        for byte in data:
            if byte in (ACK, NAK):
                return byte, time.perf_counter() - sent


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="frames a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured first")
    parser.add_argument("--no-broker", action="store_true", help="no mosquitto: the agent only buffers")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="the agent's data_dir (default: a tmp dir)"
    )
    args = parser.parse_args()
    print_machine()

    work = Path(tempfile.mkdtemp(prefix="pos-bench-"))
    data_dir = args.data_dir or work / "data"
    broker = None
    if not args.no_broker:
        from tests.support.mosquitto import Mosquitto

        broker = Mosquitto(work / "broker").start()
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    mqtt = f'host = "127.0.0.1"\nport = {broker.port}\ntls = false\n' if broker else ""
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\ntenant = "bench"\nstore = "s1"\nid = "pos-bench"\ndata_dir = "{data_dir}"\n'
        f'[mqtt]\n{mqtt}[local_api]\nenabled = false\n[log]\nlevel = "warning"\n'
        f'[[pos]]\nname = "bench"\nport = "{os.ttyname(slave)}"\n'
    )
    log = open(work / "agent.log", "wb")
    agent = subprocess.Popen([str(AGENT), "run", "--config", str(config)], stdout=log, stderr=log)
    try:
        # warm up: until the agent has opened the port and answers (NAK/silence before that)
        n = 0
        deadline = time.monotonic() + 30
        for _ in range(20):
            n += 1
            while exchange(master, encode_frame(payload(n)), 2.0)[0] != ACK:
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise SystemExit(f"the agent does not answer: {(work / 'agent.log').read_text()[-2000:]}")
        frames = [encode_frame(payload(n + 1 + i)) for i in range(int(args.rate * args.seconds))]
        # the agent's own idle cost (watchdog, uplink keepalive), to tell it apart from the frames'
        idle0, idle_t0 = cpu_seconds(agent.pid), time.perf_counter()
        time.sleep(args.idle)  # measuring an idle period, not waiting for anything
        idle_rate = (cpu_seconds(agent.pid) - idle0) / (time.perf_counter() - idle_t0)
        latencies: list[float] = []
        unanswered = 0
        period = 1.0 / args.rate
        cpu0, own0, t0 = cpu_seconds(agent.pid), time.process_time(), time.perf_counter()
        for i, frame in enumerate(frames):
            slot = t0 + i * period
            wait = slot - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # pacing: the next customer, not waiting for anything
            answer, latency = exchange(master, frame, 2.0)
            if answer == ACK:
                latencies.append(latency)
            else:
                unanswered += 1
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(agent.pid) - cpu0
        own = time.process_time() - own0
    finally:
        stop(agent, 10)
        if broker is not None:
            broker.stop()
        os.close(master)
        os.close(slave)
        log.close()
    latencies.sort()
    count = len(frames)
    print(
        f"frames: {count} at {args.rate:g}/s target, {count / wall:.1f}/s achieved, "
        f"{unanswered} without ACK, broker: {'no' if broker is None else 'mosquitto'}, data_dir: {data_dir}"
    )
    if latencies:
        ms = [v * 1000 for v in latencies]
        print(
            f"frame-to-ACK ms: p50 {percentile(ms, 50):.2f}  p99 {percentile(ms, 99):.2f}  max {ms[-1]:.2f}"
        )
    print(
        f"agent CPU: {cpu * 1e6 / count:.0f} µs per frame (user+sys, {cpu:.2f} s over {wall:.1f} s wall); "
        f"idle {idle_rate * 1000:.1f} ms/s, so {(cpu - idle_rate * wall) * 1e6 / count:.0f} µs per frame net"
    )
    print(f"bench (POS side) CPU: {own * 1e6 / count:.0f} µs per frame")
    if args.data_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
