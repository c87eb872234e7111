"""Reconnect after a broker outage: a fleet simulation and real outages.

    .venv/bin/python -m bench.reconnect              # both parts (the real one takes about 8 minutes)
    .venv/bin/python -m bench.reconnect --sim-only   # the simulation only (seconds)
    .venv/bin/python -m bench.reconnect --pairs 4 --outages 20

(a) Simulation, pure and seeded, with the real schedule classes: 3,000 agents connected to one
broker that restarts at t = 0 and listens again `down` seconds later. Every agent had a healthy
session, so its schedule starts from the bottom; while the broker is down each attempt is refused
(a quiet failure); the first attempt at or after `down` connects. Printed: connect attempts per
second against time (text histogram), for the uplink's `ReconnectSchedule` and, beside it, the
full-jitter `Backoff` capped at 30 s that the uplink used before.

(b) Real outages: several pairs of a real agent process (`store-agent run`) and its own real
mosquitto run side by side; an HTTP client posts one event every 100 ms to each agent's local
API; each broker is killed (SIGKILL) for N seconds, then restarted on its port, and a fresh
subscriber measures broker back (the restarted broker accepts connections) -> first event
received. Durations are spread over 5-300 s. Printed: every outage, then p50 and max.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.backoff import Backoff, ReconnectSchedule
from bench.machine import print_machine

AGENTS = 3000
DURATIONS = [5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, 158, 200, 240, 270, 300]


# ---- (a) the simulation ------------------------------------------------------------------------


def _new_schedule(rng: random.Random) -> Callable[[], float]:
    schedule = ReconnectSchedule(cap=30.0, rng=rng)
    return lambda: schedule.next_delay(answered=False)


def _old_schedule(rng: random.Random) -> Callable[[], float]:
    backoff = Backoff(cap=30.0, rng=rng)
    return backoff.next_delay


def simulate(
    make: Callable[[random.Random], Callable[[], float]], down: float, agents: int = AGENTS, seed: int = 12
) -> tuple[list[float], list[float]]:
    """Attempt times and connect times of `agents` agents after a restart lasting `down` seconds."""
    rng = random.Random(seed)
    attempts: list[float] = []
    connects: list[float] = []
    for _ in range(agents):
        delay = make(random.Random(rng.getrandbits(64)))
        t = delay()  # the first wait after a healthy session was lost
        while t < down:
            attempts.append(t)
            t += delay()
        attempts.append(t)
        connects.append(t)
    return attempts, connects


def _per_second(times: list[float], horizon: int) -> list[int]:
    bins = [0] * horizon
    for t in times:
        if t < horizon:
            bins[int(t)] += 1
    return bins


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_simulation(down: float = 20.0) -> None:
    horizon = int(down) + 32
    new_a, new_c = simulate(_new_schedule, down)
    old_a, old_c = simulate(_old_schedule, down)
    na, nc, oa, oc = (_per_second(x, horizon) for x in (new_a, new_c, old_a, old_c))
    print(
        f"\n(a) simulation: {AGENTS} agents, broker restarts at t=0 and listens again at t={down:g} s "
        f"(seeded; the real schedule classes)"
    )
    print(
        "    t (s) | new: attempts/s  connects/s | old full jitter 30 s: attempts/s  connects/s | new attempts"
    )
    peak = max(na) or 1
    for t in range(horizon):
        bar = "#" * round(50 * na[t] / peak)
        mark = "  <- broker back" if t == int(down) else ""
        print(f"    {t:5d} | {na[t]:15d} {nc[t]:11d} | {oa[t]:36d} {oc[t]:11d} | {bar}{mark}")
    print()
    for label, att, con in (("new", new_a, new_c), ("old", old_a, old_c)):
        waits = [c - down for c in con]
        during = [t for t in att if t < down]
        print(
            f"    {label}: attempts while down {len(during)} ({len(during) / down:.0f}/s); "
            f"peak connects {max(_per_second(con, horizon))}/s; broker back -> connected "
            f"p50 {statistics.median(waits):.2f} s, p99 {_quantile(waits, 0.99):.2f} s, max {max(waits):.2f} s"
        )
    for other in (2.0, 300.0):
        a, c = simulate(_new_schedule, other)
        waits = [x - other for x in c]
        print(
            f"    new, restart of {other:g} s: peak connects {max(_per_second(c, int(other) + 32))}/s; "
            f"attempts while down {sum(1 for t in a if t < other) / other:.0f}/s; "
            f"broker back -> connected p50 {statistics.median(waits):.2f} s, max {max(waits):.2f} s"
        )


# ---- (b) real outages --------------------------------------------------------------------------

TOKEN = "bench-token"


class _Pair:
    """One agent process and its own broker; a poster thread feeds the agent's local API."""

    def __init__(self, root: Path, index: int) -> None:
        from tests.support.agentproc import AgentProcess, write_config
        from tests.support.mosquitto import Mosquitto, free_port

        self.root = root / f"pair{index}"
        self.root.mkdir(parents=True)
        self.index = index
        self.port = free_port()
        self.api_port = free_port()
        (self.root / "token").write_text(TOKEN + "\n")
        config = write_config(
            self.root / "agent.toml", self.root / "data", self.port, api_port=self.api_port, agent=f"a{index}"
        )
        text = config.read_text().replace("backoff_max_s = 1.0", "backoff_max_s = 30.0")  # the default
        text = text.replace(
            f'listen = "127.0.0.1:{self.api_port}"\n',
            f'listen = "127.0.0.1:{self.api_port}"\ntoken_file = "{self.root / "token"}"\n',
        )
        config.write_text(text)
        self.broker = Mosquitto(self.root / "mq", port=self.port).start()
        self.agent = AgentProcess(config, self.root / "agent.log").start()
        self.topic = f"retail/acme/s1/a{index}/up/#"
        self._stop = threading.Event()
        self._poster = threading.Thread(target=self._post, daemon=True)
        self.results: list[tuple[int, float]] = []

    def _post(self) -> None:
        i = 0
        while not self._stop.wait(0.1):
            body = json.dumps([{"type": "app.tick", "data": {"i": i}}]).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.api_port}/v1/events",
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5):
                    pass
                i += 1
            except OSError:
                pass  # the agent is still starting

    def _first_event(self, since: float, timeout: float) -> float | None:
        """Subscribe now; the time the first event arrives, or None after `timeout`."""
        from tests.support.subscriber import Collector

        got: list[float] = []
        collector = Collector(self.port, self.topic, client_id=f"bench-{self.index}-{since}")
        original = collector._on_message

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if not got and "/up/" in msg.topic:
                got.append(time.monotonic())
            original(client, userdata, msg)

        collector.client.on_message = on_message
        collector.start()
        try:
            deadline = time.monotonic() + timeout
            while not got and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            collector.stop()
        return got[0] if got else None

    def run(self, durations: list[int]) -> None:
        self._poster.start()
        try:
            # steady state first: connected, events flowing, the session healthy
            if self._first_event(time.monotonic(), 60) is None:
                raise RuntimeError(f"pair {self.index}: no event before the first outage")
            time.sleep(12)
            for duration in durations:
                self.broker.kill()
                time.sleep(duration)
                self.broker.start()
                back = time.monotonic()  # the restarted broker accepts connections
                first = self._first_event(back, 60)
                wait = (first - back) if first is not None else float("inf")
                self.results.append((duration, wait))
                print(
                    f"    pair {self.index}: outage {duration:4d} s -> first event {wait:6.2f} s after broker back",
                    flush=True,
                )
                time.sleep(12)  # let the new session prove healthy before the next kill
        finally:
            self._stop.set()
            self.agent.stop()
            self.broker.stop()


def run_outages(pairs: int, durations: list[int]) -> list[tuple[int, float]]:
    """Spread the outages over `pairs` agent/broker pairs (longest first onto the least loaded)."""
    loads: list[list[int]] = [[] for _ in range(pairs)]
    for d in sorted(durations, reverse=True):
        min(loads, key=sum).append(d)
    for plan in loads:
        plan.sort()
    print(
        f"\n(b) real outages: {len(durations)} outages of {min(durations)}-{max(durations)} s over {pairs} "
        f"agent/broker pairs in parallel (longest plan {max(sum(p) for p in loads)} s of outage)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        workers = [_Pair(Path(tmp), i) for i in range(pairs)]
        threads = [
            threading.Thread(target=w.run, args=(plan,)) for w, plan in zip(workers, loads, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    results = [r for w in workers for r in w.results]
    waits = [w for _, w in results]
    print(
        f"\n    broker back -> first event received: p50 {statistics.median(waits):.2f} s, "
        f"max {max(waits):.2f} s over {len(waits)} outages of {min(durations)}-{max(durations)} s"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sim-only", action="store_true")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--outages", type=int, default=len(DURATIONS))
    parser.add_argument("--down", type=float, default=20.0, help="the simulated restart's length (s)")
    args = parser.parse_args(argv)
    print_machine()
    print_simulation(args.down)
    if not args.sim_only:
        durations = (
            DURATIONS
            if args.outages == len(DURATIONS)
            else [round(5 * (60 ** (i / max(1, args.outages - 1)))) for i in range(args.outages)]
        )
        run_outages(args.pairs, durations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
