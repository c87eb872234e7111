"""The local web server under the field test's three attacks: what the agent holds, and whether a client gets in.

    .venv/bin/python bench/web_limits.py [--halves 8300] [--bodies 250]

Starts `store-agent run` (no broker: buffering only) with its local API on a free loopback port,
then, one after the other:

1. one connection sends endless headers (up to 600 MB): how many bytes the agent took before it
   closed the connection, and its peak RSS (the field test: 562 MB);
2. `--halves` idle half-requests (a request line and one header, never finished): whether a
   normal GET /healthz and POST /v1/events still get 200 while they are open, and the latency of
   that GET (the field test: 8,300 locked every client out);
3. `--bodies` authenticated POSTs with chunked bodies that send 4 MiB less one byte and stall:
   how many got 503 `busy`, and the agent's peak RSS (the field test: 1 GB held).

Prints the machine line first, then figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.child import stop  # noqa: E402
from bench.local_api import memory_mb  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from tests.support.agentproc import STORE_AGENT  # noqa: E402
from tests.support.mosquitto import free_port  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

TOKEN = "bench-token-0123456789"


def wait_healthy(url: str, timeout: float = 20.0) -> None:
    def answers() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    if not wait_until(answers, timeout, interval=0.05):
        raise RuntimeError("the agent did not answer /healthz")


def endless_headers(port: int, limit: int = 600 * 1024 * 1024) -> int:
    """Bytes sent before the agent closed the connection (or `limit`)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    sent = 0
    s.settimeout(10)
    try:
        while sent < limit:
            s.sendall(line)
            sent += len(line)
    except OSError:
        pass
    s.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--halves", type=int, default=8300)
    parser.add_argument("--bodies", type=int, default=250)
    args = parser.parse_args()
    print_machine()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.halves + args.bodies + 256)), hard))

    with tempfile.TemporaryDirectory(prefix="bench-web-limits-") as tmp:
        work = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        (work / "token").write_text(TOKEN + "\n")
        config = work / "agent.toml"
        config.write_text(
            f'[agent]\ntenant = "bench"\nstore = "s1"\nid = "a1"\ndata_dir = "{work / "data"}"\n'
            f'[local_api]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{work / "token"}"\n'
            '[log]\nlevel = "error"\n'
        )
        log = open(work / "agent.log", "wb")
        agent = subprocess.Popen([STORE_AGENT, "run", "--config", str(config)], stdout=log, stderr=log)
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        try:
            wait_healthy(url)
            print(
                f"agent idle: RSS {memory_mb(agent.pid, 'VmRSS'):.1f} MB, open-file limit "
                f"{Path(f'/proc/{agent.pid}/limits').read_text().split('Max open files')[1].split()[0]}"
            )

            sent = endless_headers(port)
            print(
                f"1. endless headers: the agent closed the connection after {sent / 1e6:.2f} MB sent "
                f"(socket buffers included); agent peak RSS {memory_mb(agent.pid):.1f} MB"
            )

            halves = []
            for _ in range(args.halves):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
                halves.append(s)
            with httpx.Client(base_url=url, timeout=10) as c:
                t0 = time.perf_counter()
                health = c.get("/healthz").status_code
                latency = time.perf_counter() - t0
                posted = c.post(
                    "/v1/events", content=b'[{"type": "app.x", "data": {}}]', headers=auth
                ).status_code
            open_fds = len(list(Path(f"/proc/{agent.pid}/fd").iterdir()))
            print(
                f"2. {args.halves} idle half-requests open: GET /healthz {health} in {latency * 1000:.1f} ms, "
                f"POST /v1/events {posted}; the agent holds {open_fds} file descriptors"
            )
            for s in halves:
                s.close()

            bodies = []
            chunk = b" " * (1 << 20)
            for _ in range(args.bodies):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(
                    f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                )
                s.sendall(b"1\r\n[\r\n")
                bodies.append(s)
            busy = 0
            for s in bodies:
                s.settimeout(0.5)
                try:
                    for _ in range(3):
                        s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk) - 2, chunk[:-2]))
                except OSError:
                    pass
            time.sleep(2)  # let the agent read what was sent
            for s in bodies:
                s.settimeout(0.2)
                try:
                    if s.recv(65536).startswith(b"HTTP/1.1 503"):
                        busy += 1
                except OSError:
                    pass
            print(
                f"3. {args.bodies} chunked bodies of 4 MiB less a byte, stalled: {busy} answered 503 busy; "
                f"agent peak RSS {memory_mb(agent.pid):.1f} MB"
            )
            for s in bodies:
                s.close()
        finally:
            stop(agent, 15)
            log.close()


if __name__ == "__main__":
    main()
