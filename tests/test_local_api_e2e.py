"""The local event API end to end: the real `store-agent run` process, a real mosquitto, HTTP clients.

Concurrent clients post while the agent is killed with SIGKILL. Every request that got a 200 must
arrive upstream; a request that got no answer is retried after the restart with the same
Idempotency-Key and must be stored once: each of its events arrives under exactly one id, the
one the retry's answer names.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.agentproc import AgentProcess, write_config
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.subscriber import Collector

TOKEN = "e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
PER_REQUEST = 50


def api_agent(
    tmp: Path, broker_port: int, preexec_fn: Callable[[], None] | None = None
) -> tuple[AgentProcess, int]:
    """The real agent with its local API on a free port (bearer TOKEN), not yet started; and that port."""
    port = free_port()
    (tmp / "token").write_text(TOKEN + "\n")
    config = write_config(
        tmp / "agent.toml",
        tmp / "data",
        broker_port,
        api_port=port,
        extra=f'token_file = "{tmp / "token"}"\n[log]\nlevel = "warning"\n',
    )
    agent = AgentProcess(config, tmp / "agent.log", preexec_fn=preexec_fn)
    agent.env = {k: v for k, v in os.environ.items() if not k.startswith("STORE_AGENT")}
    return agent, port


def start(agent: AgentProcess, port: int) -> str:
    """Start the agent and wait until its /healthz answers 200; returns the API's base URL."""
    url = f"http://127.0.0.1:{port}"
    assert agent.start().wait_http(f"{url}/healthz"), agent.tail(2000)
    return url


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.port, "retail/acme/s1/a1/up/#", client_id="e2e-collector").start()
    yield c
    c.stop()


def request_body(key: str) -> bytes:
    return orjson.dumps(
        [{"type": "app.checkin", "source": "e2e", "data": {"req": key, "i": i}} for i in range(PER_REQUEST)]
    )


def test_answered_requests_arrive_and_unanswered_ones_are_stored_once_after_a_kill(
    tmp_path: Path, broker: Mosquitto, collector: Collector
) -> None:
    agent, port = api_agent(tmp_path, broker.port)
    url = start(agent, port)
    answered: dict[str, list[str]] = {}  # key -> ids of its 200 answer
    unanswered: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=15) as c:
            for n in range(10_000):  # bounded; ends at the kill
                key = f"w{worker}-r{n}"
                try:
                    r = c.post(
                        "/v1/events", content=request_body(key), headers={**AUTH, "Idempotency-Key": key}
                    )
                except httpx.TransportError:
                    with lock:
                        unanswered.append(key)
                    return
                assert r.status_code == 200, r.text
                with lock:
                    answered[key] = r.json()["ids"]
                    if len(answered) >= 60:
                        enough.set()

    # one request is surely in flight at the kill: its body is never finished
    partial = socket.create_connection(("127.0.0.1", port))
    partial_body = request_body("partial")
    partial.sendall(
        f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\n"
        f"Idempotency-Key: partial\r\nContent-Length: {len(partial_body)}\r\n\r\n".encode()
        + partial_body[: len(partial_body) // 2]
    )
    unanswered.append("partial")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        assert enough.wait(30), "clients made too little progress"
        agent.kill9()
        for t in threads:
            t.join(20)
        partial.close()
        assert not any(t.is_alive() for t in threads)

        start(agent, port)  # same data dir: the buffer and the idempotency keys survive
        with httpx.Client(base_url=url, timeout=15) as c:
            for key in unanswered:
                r = c.post("/v1/events", content=request_body(key), headers={**AUTH, "Idempotency-Key": key})
                assert r.status_code == 200, r.text
                answered[key] = r.json()["ids"]
                # and again: the same answer, nothing new
                again = c.post(
                    "/v1/events", content=request_body(key), headers={**AUTH, "Idempotency-Key": key}
                )
                assert again.content == r.content

        expected = {i for ids in answered.values() for i in ids}
        assert len(expected) == len(answered) * PER_REQUEST
        arrived = collector.wait_for(lambda c: expected <= {e["id"] for e in c.events}, timeout=30)
        with collector.lock:
            events = list(collector.events)
        missing = expected - {e["id"] for e in events}
        assert arrived, f"{len(missing)} acknowledged events never arrived upstream"

        ids_of: dict[tuple[str, int], set[str]] = defaultdict(set)
        for e in events:
            ids_of[(e["data"]["req"], e["data"]["i"])].add(e["id"])
        for key, ids in answered.items():
            for i, event_id in enumerate(ids):
                assert ids_of[(key, i)] == {event_id}, (key, i, ids_of[(key, i)])
        # nothing arrived that no answer names (a request stored twice would show here)
        assert {i for s in ids_of.values() for i in s} == expected
    finally:
        agent.stop()


def test_answers_do_not_wait_for_the_broker(tmp_path: Path, broker: Mosquitto) -> None:
    """With the broker down the API answers 200 from the buffer, and /healthz says so in its body."""
    broker.kill()
    agent, port = api_agent(tmp_path, broker.port)
    url = start(agent, port)
    try:
        with httpx.Client(base_url=url, timeout=15) as c:
            for n in range(5):
                r = c.post("/v1/events", content=request_body(f"down-{n}"), headers=AUTH)
                assert r.status_code == 200
            health = c.get("/healthz")
            assert health.status_code == 200
            assert health.json()["mqtt"]["connected"] is False
            assert c.get("/v1/status").json()["buffer"]["events"] == 5 * PER_REQUEST
    finally:
        agent.stop()


def few_files() -> None:
    """An open-file limit of 200 for the agent, as a small box or a strict unit might give it."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))


def test_idle_half_requests_never_lock_a_client_out(tmp_path: Path, broker: Mosquitto) -> None:
    """More half-requests than the agent has file descriptors: a normal request still gets 200.

    Before the connection cap, the field test's 8,300 idle half-requests used up the agent's
    descriptors, and no client could connect any more.
    """
    agent, port = api_agent(tmp_path, broker.port, preexec_fn=few_files)
    url = start(agent, port)
    assert agent.proc is not None
    assert "Max open files            200" in Path(f"/proc/{agent.pid}/limits").read_text()
    halves: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
            halves.append(s)
        with httpx.Client(base_url=url, timeout=10) as c:
            for n in range(3):
                assert c.get("/healthz").status_code == 200
                assert (
                    c.post("/v1/events", content=request_body(f"after-{n}"), headers=AUTH).status_code == 200
                )
        assert agent.alive()
    finally:
        for s in halves:
            s.close()
        agent.stop()
