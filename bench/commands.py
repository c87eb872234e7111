"""Command round trip against the real agent: command published → reply received, and agent CPU per command.

    .venv/bin/python bench/commands.py [--count 500] [--backlog 200000] [--data-dir DIR]

Starts a local mosquitto and the agent (`store-agent run`), plays the cloud with an MQTT 5 client
and sends `--count` commands one after the other (stop and wait), for each kind measured:
`status`, `set_log_level` and, signed, `erase_subject` (on an empty-ish buffer). Then the same
`status` run while the agent drains a backlog of `--backlog` events committed before it started:
replies go out on the live session, not behind the backlog.

The latency is measured by the client, from its PUBLISH to the reply's arrival: two broker hops
on loopback besides the agent's own work (receipt, checks, the record and its event committed
with an fsync, the reply published), so it bounds "command received → reply published" from
above. CPU is the agent's user+sys from /proc/PID/stat over each run, divided by the commands
(during the backlog run it includes the drain). The broker runs with `set_tcp_nodelay true`
(`--broker-nagle` leaves mosquitto's default, false: Nagle and delayed ACKs on the broker's side
then add about 80 ms to a stop-and-wait round trip, whatever the agent does).
Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from agent.core.envelope import Event  # noqa: E402
from bench.child import cpu_seconds  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from tests.support.agentproc import AgentProcess, prefill, toml_table, write_config  # noqa: E402
from tests.support.commander import Commander, sign  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(cloud: Commander, agent: AgentProcess, label: str, count: int, make) -> None:
    latencies = []
    cpu0 = cpu_seconds(agent.pid)
    for i in range(count):
        cid = str(uuid.uuid4())
        name, body = make(cid, i)
        sent = cloud.send(name, body)
        if not wait_until(lambda cid=cid: cloud.reply_time(cid) is not None, 30, interval=0.0005):
            print(f"{label}: no reply to {cid}", flush=True)
            return
        latencies.append(cloud.reply_time(cid) - sent)  # type: ignore[operator]
    cpu = cpu_seconds(agent.pid) - cpu0
    ms = [x * 1000 for x in latencies]
    print(
        f"{label:<34} n={count:<5} p50={pct(ms, 0.5):6.2f} ms  p99={pct(ms, 0.99):6.2f} ms  "
        f"max={max(ms):6.2f} ms  agent CPU {cpu / count * 1000:5.2f} ms/command",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--broker-nagle", action="store_true", help="leave mosquitto's set_tcp_nodelay at its default (false)"
    )
    args = parser.parse_args()
    nodelay = not args.broker_nagle
    print_machine()
    work = Path(tempfile.mkdtemp(prefix="bench-commands-"))
    data = args.data_dir or work / "data"
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    broker = Mosquitto(work / "mq", extra_conf="set_tcp_nodelay true\n" if nodelay else "").start()
    print(
        f"data_dir {data}; broker mosquitto on 127.0.0.1:{broker.port}, set_tcp_nodelay {str(nodelay).lower()}",
        flush=True,
    )
    cfg = write_config(
        work / "agent.toml",
        data,
        broker.port,
        toml_table("log", {"level": "warning"}) + toml_table("commands.public_keys", {"ops": pub}),
    )
    cloud = Commander(broker.port, client_id="bench-cloud").start()
    agent = AgentProcess(cfg, work / "agent.log").start()
    try:
        if not cloud.wait_serving():
            raise SystemExit(f"the agent did not answer: {agent.tail()}")
        run(cloud, agent, "status", args.count, lambda cid, i: ("status", {"id": cid}))
        run(
            cloud,
            agent,
            "set_log_level",
            args.count,
            lambda cid, i: ("set_log_level", {"id": cid, "args": {"level": "warning"}}),
        )
        run(
            cloud,
            agent,
            "erase_subject (signed)",
            args.count,
            lambda cid, i: (
                "erase_subject",
                sign(
                    key,
                    "ops",
                    "erase_subject",
                    {"id": cid, "expires": "2099-01-01T00:00:00Z", "args": {"member_id": f"M{i}"}},
                ),
            ),
        )
        agent.stop()
        if args.backlog:
            prefill(
                data,
                [
                    Event(
                        "pos.sale",
                        {"txn_id": f"T{i}", "total": "12.50", "member_id": f"M{i % 977}"},
                        "pos:front-1",
                    )
                    for i in range(args.backlog)
                ],
            )
            agent.start()
            if not cloud.wait_serving():
                raise SystemExit(f"the agent did not answer: {agent.tail()}")
            run(
                cloud,
                agent,
                f"status, draining {args.backlog} events",
                min(args.count, 200),
                lambda cid, i: ("status", {"id": cid}),
            )
    finally:
        agent.stop()
        cloud.stop()
        broker.stop()
        if args.data_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
