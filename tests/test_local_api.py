"""The local event API (contract sections 2.1 and 9) over real HTTP: uvicorn on a free loopback port,
a real Outbox on a SQLite file in tmp_path, httpx clients (and a raw socket where httpx cannot show it).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer import Outbox, read_chunks
from agent.buffer.idempotency import prune_idempotency
from agent.config import AgentConfig
from agent.core.envelope import utc_ms
from agent.health import HealthBoard
from agent.status import StatusReporter
from agent.uplink import Uplink
from agent.web import make_app, rfc3339_utc_ms
from tests.support.mosquitto import free_port

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UUID7 = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class ApiServer:
    """The app served by uvicorn in a thread (its own event loop), over a real Outbox."""

    def __init__(self, tmp: Path, *, token: str | None = TOKEN, max_bytes: int = 1 << 30,
                 streams: list[str] | None = None, clock: Any = time.time) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        api: dict[str, Any] = {"listen": f"127.0.0.1:{self.port}"}
        if token is not None:
            (tmp / "token").write_text(token + "\n")
            api["token_file"] = str(tmp / "token")
        if streams is not None:
            api["streams"] = streams
        self.cfg = AgentConfig.model_validate({
            "agent": {"tenant": "acme", "store": "s1", "id": "a1", "data_dir": str(tmp)},
            "mqtt": {"host": None},
            "buffer": {"max_bytes": max(max_bytes, 64 * 1024)},
            "local_api": api,
        })
        self.outbox = Outbox(tmp / "buffer.db", tenant="acme", store="s1", agent="a1",
                             max_bytes=max_bytes, clock=clock).start()
        self.uplink = Uplink(self.cfg, self.outbox)
        self.reporter = StatusReporter(self.outbox, self.uplink, HealthBoard())
        app = make_app(self.cfg, self.outbox, self.reporter, self.uplink)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="off", http="httptools", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn exited"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.outbox.close()

    def stored(self) -> int:
        """Events committed so far (nothing is sent: no broker)."""
        self.outbox.flush()
        conn = sqlite3.connect(self.tmp / "buffer.db")
        try:
            return conn.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0]
        finally:
            conn.close()

    def envelopes(self) -> list[dict[str, Any]]:
        """Every stored envelope, in seq order."""
        self.outbox.flush()
        conn = sqlite3.connect(self.tmp / "buffer.db")
        try:
            chunks = read_chunks(conn, 0, 1_000_000)
        finally:
            conn.close()
        return [e for c in chunks for e in orjson.loads(b"[" + c.body + b"]")]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def client(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as c:
        yield c


def ev(i: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "app.checkin", "data": {"n": i}, **extra}


def post(client: httpx.Client, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/v1/events", content=content, headers={**AUTH, **(headers or {})}, **kw)


def assert_alive(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert post(client, [ev()]).status_code == 200


# ---- auth ------------------------------------------------------------------------------------------


def test_requests_without_the_right_bearer_token_get_401(api: ApiServer, client: httpx.Client) -> None:
    body = orjson.dumps([ev()])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        r = client.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.stored() == 0
    assert client.post("/v1/events", content=body, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert api.stored() == 1


def test_without_a_token_file_every_post_is_refused(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, token=None)
    try:
        with httpx.Client(base_url=server.url) as c:
            for auth in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer None"}, AUTH):
                assert c.post("/v1/events", content=b"[]", headers=auth).status_code == 401
            assert c.get("/healthz").status_code == 200  # the rest of the server still answers
        assert server.stored() == 0
    finally:
        server.stop()


# ---- accepted bodies --------------------------------------------------------------------------------


def test_a_json_array_is_committed_and_answered_with_ids_in_order(api: ApiServer, client: httpx.Client) -> None:
    events = [
        {"type": "app.checkin", "data": {"member": "m-1"}, "source": "tablet-3", "ts": "2026-11-23T09:15:02.125+01:00"},
        {"type": "app.checkout", "data": {}},
        {"type": "app.note", "data": {"text": "é✓", "nested": {"a": [1, 2.5, None, True]}}, "ts": "2026-11-23T08:15:02Z"},
    ]
    r = post(client, events)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 3
    assert len(set(body["ids"])) == 3
    for i in body["ids"]:
        assert __import__("re").match(UUID7, i)
    stored = api.envelopes()
    assert [e["id"] for e in stored] == body["ids"]
    assert [e["seq"] for e in stored] == sorted(e["seq"] for e in stored)
    assert stored[0]["ts"] == "2026-11-23T08:15:02.125Z"
    assert stored[0]["source"] == "tablet-3"
    assert stored[1]["source"] == "local_api"
    assert stored[2]["ts"] == "2026-11-23T08:15:02.000Z"
    assert stored[2]["data"] == events[2]["data"]
    assert [e["type"] for e in stored] == ["app.checkin", "app.checkout", "app.note"]
    assert all(e["tenant"] == "acme" and e["store"] == "s1" and e["agent"] == "a1" for e in stored)


def test_ndjson_is_one_event_a_line(api: ApiServer, client: httpx.Client) -> None:
    lines = b"\n".join(orjson.dumps(ev(i)) for i in range(4)) + b"\n\n"
    r = post(client, lines, {"Content-Type": "application/x-ndjson; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 4
    assert [e["data"]["n"] for e in api.envelopes()] == [0, 1, 2, 3]
    # the same bytes sent as JSON are not a JSON array
    assert post(client, lines, {"Content-Type": "application/json"}).status_code == 400


def test_an_empty_array_is_a_200_with_no_ids(api: ApiServer, client: httpx.Client) -> None:
    r = post(client, b"[]")
    assert r.status_code == 200
    assert r.json() == {"accepted": 0, "ids": []}
    r = post(client, b"", {"Content-Type": "application/x-ndjson"})
    assert r.json() == {"accepted": 0, "ids": []}
    assert api.stored() == 0


def test_other_streams_are_admitted_when_configured(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, streams=["app", "kiosk"])
    try:
        with httpx.Client(base_url=server.url) as c:
            assert post(c, [{"type": "kiosk.tap", "data": {}}]).status_code == 200
            r = post(c, [{"type": "pos.sale", "data": {}}])
            assert r.status_code == 400
            assert "accepted: app, kiosk" in r.json()["errors"][0]["reason"]
    finally:
        server.stop()


# ---- refused bodies ----------------------------------------------------------------------------------


def test_every_bad_event_is_listed_by_index_and_nothing_is_committed(api: ApiServer, client: httpx.Client) -> None:
    events: list[Any] = [
        ev(0),
        {"type": "pos.sale", "data": {}},                     # 1: a device stream
        {"type": "app.x"},                                      # 2: no data
        {"type": "app.x", "data": [1, 2]},                      # 3: data not an object
        ev(4),
        {"type": "app.x", "data": {}, "ts": "2026-11-23T09:15:02"},  # 5: no offset
        {"type": "app.x", "data": {}, "ts": "2026-02-30T09:15:02Z"},  # 6: no such day
        "app.x",                                                # 7: not an object
        {"type": "appx", "data": {}},                           # 8: not stream.name
        {"type": "app.x", "data": {}, "source": 5},             # 9: source not a string
        {"type": "app.x", "data": {}, "extra": 1},              # 10: unknown field
        {"data": {}},                                           # 11: no type
        {"type": "app.", "data": {}},                           # 12: empty name
        {"type": "app.x", "data": "{}"},                        # 13: data a string
        {"type": "app.x", "data": {}, "ts": 1764000000},        # 14: ts a number
    ]
    r = post(client, events)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "invalid_events"
    errors = {e["index"]: e["reason"] for e in body["errors"]}
    assert sorted(errors) == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert "'pos' is not accepted" in errors[1]
    assert "data is missing" in errors[2]
    assert "data must be a JSON object" in errors[3]
    assert "RFC 3339" in errors[5]
    assert "not a valid date" in errors[6]
    assert "must be a JSON object" in errors[7]
    assert "stream.name" in errors[8]
    assert "source" in errors[9]
    assert "unknown field 'extra'" in errors[10]
    assert "type is missing" in errors[11]
    assert "ts must be a string" in errors[14]
    assert api.stored() == 0
    assert_alive(client)


def test_an_unknown_field_alone_is_refused(api: ApiServer, client: httpx.Client) -> None:
    r = post(client, [ev(0), {"type": "app.x", "data": {}, "timestamp": "2026-11-23T09:15:02Z"}])
    assert r.status_code == 400
    assert r.json()["errors"] == [{"index": 1, "reason": "unknown field 'timestamp' (an event has type, data, source, ts)"}]
    assert api.stored() == 0


def test_a_day_that_does_not_exist_alone_is_refused(api: ApiServer, client: httpx.Client) -> None:
    r = post(client, [ev(0), ev(1, ts="2026-04-31T09:15:02Z")])
    assert r.status_code == 400
    assert [e["index"] for e in r.json()["errors"]] == [1]
    assert api.stored() == 0


@pytest.mark.parametrize(
    "body",
    [
        b'[{"type": "app.x", "data": {}}',                    # truncated
        b'{"type": "app.x", "data": {}}',                     # an object, not an array
        b"42",
        b"",
        b"[" * 100_000,                                       # deeply nested
        b"[" * 100_000 + b"]" * 100_000,
        b'[{"type": "app.x", "data": {"a": "\xff\xfe"}}]',    # invalid UTF-8
        b'[{"type": "app.x", "data": {"a": "\\ud800"}}]',     # a lone surrogate
        b'\xef\xbb\xbf[{"type": "app.x", "data": {}}]',       # a byte order mark
        b'[{"type": "app.x", "data": {"a": NaN}}]',
        b"\x00\x01\x02",
    ],
)
def test_unparseable_bodies_are_a_400_as_a_whole(api: ApiServer, client: httpx.Client, body: bytes) -> None:
    r = post(client, body)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_json"
    assert "Traceback" not in r.text
    assert api.stored() == 0
    assert_alive(client)


def test_a_bad_ndjson_line_is_named(api: ApiServer, client: httpx.Client) -> None:
    body = orjson.dumps(ev(0)) + b"\n" + orjson.dumps(ev(1))[:-1] + b"\n" + orjson.dumps(ev(2))
    r = post(client, body, {"Content-Type": "application/x-ndjson"})
    assert r.status_code == 400
    assert r.json()["reason"].startswith("line 2:")
    assert api.stored() == 0


# ---- limits ----------------------------------------------------------------------------------------------


def test_more_than_5000_events_is_a_413_even_when_each_is_good(api: ApiServer, client: httpx.Client) -> None:
    events = [{"type": "app.x", "data": {}}] * 5001
    r = post(client, events)
    assert r.status_code == 413
    assert r.json()["error"] == "too_many_events"
    r = post(client, b"\n".join(orjson.dumps(e) for e in events), {"Content-Type": "application/x-ndjson"})
    assert r.status_code == 413
    assert api.stored() == 0
    r = post(client, events[:5000])
    assert r.status_code == 200
    assert r.json()["accepted"] == 5000
    assert api.stored() == 5000


def body_of_size(size: int, n: int) -> bytes:
    """A JSON array of `n` good events padded to exactly `size` bytes."""
    base = orjson.dumps([{"type": "app.x", "data": {"p": ""}}] * n)
    pad, extra = divmod(size - len(base), n)
    events = [{"type": "app.x", "data": {"p": "x" * (pad + (1 if i < extra else 0))}} for i in range(n)]
    body = orjson.dumps(events)
    assert len(body) == size
    return body


def test_4_mib_is_accepted_and_one_byte_more_is_a_413(api: ApiServer, client: httpx.Client) -> None:
    limit = 4 * 1024 * 1024
    r = post(client, body_of_size(limit + 1, 100))
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"
    assert api.stored() == 0
    r = post(client, body_of_size(limit, 100))
    assert r.status_code == 200
    assert api.stored() == 100


def test_a_10_mb_body_is_refused_and_the_server_lives_on(api: ApiServer, client: httpx.Client) -> None:
    big = b"[" + b'{"type": "app.x", "data": {}},' * 350_000 + b'{"type": "app.x", "data": {}}]'
    assert len(big) > 10_000_000
    r = post(client, big)  # with Content-Length: refused before reading
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length (chunked): refused while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post("/v1/events", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"  # the bytes, not the events counted after reading it all
    assert api.stored() == 0
    assert_alive(client)


def test_reading_stops_at_the_limit_without_waiting_for_the_rest(api: ApiServer) -> None:
    """A chunked body that never ends is answered 413 once 4 MiB have arrived: it is not buffered whole."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=20) as s:
        s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"[" + b" " * (1 << 20)

        def send() -> None:
            try:
                for _ in range(5):  # 5 MiB and no terminating chunk
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed without reading the rest
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = s.recv(65536)
            assert data, "connection closed without an answer"
            answer += data
        sender.join(10)
    assert answer.startswith(b"HTTP/1.1 413")
    assert api.stored() == 0


# ---- idempotency -----------------------------------------------------------------------------------------


def test_a_retry_with_the_same_key_gets_the_first_answer_and_commits_nothing(api: ApiServer,
                                                                             client: httpx.Client) -> None:
    body = [ev(1), ev(2)]
    first = post(client, body, {"Idempotency-Key": "order-77"})
    assert first.status_code == 200
    assert "idempotent-replayed" not in first.headers
    again = post(client, body, {"Idempotency-Key": "order-77"})
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert api.stored() == 2
    other = post(client, body, {"Idempotency-Key": "order-78"})
    assert other.status_code == 200
    assert set(other.json()["ids"]).isdisjoint(first.json()["ids"])
    assert api.stored() == 4


def test_the_same_key_with_another_body_is_a_422(api: ApiServer, client: httpx.Client) -> None:
    assert post(client, [ev(1)], {"Idempotency-Key": "k"}).status_code == 200
    r = post(client, [ev(2)], {"Idempotency-Key": "k"})
    assert r.status_code == 422
    assert r.json()["error"] == "idempotency_key_reused"
    assert api.stored() == 1


def test_only_200_answers_are_remembered(api: ApiServer, client: httpx.Client) -> None:
    assert post(client, [{"type": "pos.sale", "data": {}}], {"Idempotency-Key": "k"}).status_code == 400
    assert post(client, b"[", {"Idempotency-Key": "k"}).status_code == 400
    r = post(client, [ev(1)], {"Idempotency-Key": "k"})
    assert r.status_code == 200
    assert api.stored() == 1


def test_a_bad_key_is_a_400(api: ApiServer, client: httpx.Client) -> None:
    for key in ("", "a b", "x" * 256, "clé"):
        headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"Idempotency-Key", key.encode("utf-8"))]
        r = client.post("/v1/events", content=b"[]", headers=headers)
        assert r.status_code == 400, key
        assert r.json()["error"] == "invalid_idempotency_key"


def test_the_same_key_while_the_first_is_being_committed_is_a_409(api: ApiServer) -> None:
    # hold SQLite's write lock so that the first commit waits
    blocker = sqlite3.connect(api.tmp / "buffer.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    body = orjson.dumps([ev(1)])
    headers = {**AUTH, "Idempotency-Key": "slow"}
    try:
        with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=api.url, timeout=30) as c1, \
                httpx.Client(base_url=api.url, timeout=30) as c2:
            futures = [pool.submit(c.post, "/v1/events", content=body, headers=headers) for c in (c1, c2)]
            deadline = time.monotonic() + 20
            while not any(f.done() for f in futures):  # the one that is not in flight answers at once
                assert time.monotonic() < deadline
                time.sleep(0.01)
            done = next(f for f in futures if f.done())
            assert done.result().status_code == 409
            assert done.result().json()["error"] == "request_in_progress"
            blocker.execute("ROLLBACK")
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200, 409]
    finally:
        blocker.close()
    assert api.stored() == 1
    with httpx.Client(base_url=api.url) as c:
        assert c.post("/v1/events", content=body, headers=headers).status_code == 200
    assert api.stored() == 1


def test_keys_are_remembered_across_a_restart(tmp_path: Path) -> None:
    server = ApiServer(tmp_path)
    with httpx.Client(base_url=server.url) as c:
        first = post(c, [ev(1), ev(2), ev(3)], {"Idempotency-Key": "across"})
    assert first.status_code == 200
    server.stop()
    server = ApiServer(tmp_path)
    try:
        with httpx.Client(base_url=server.url) as c:
            again = post(c, [ev(1), ev(2), ev(3)], {"Idempotency-Key": "across"})
            assert again.status_code == 200
            assert again.content == first.content
            assert post(c, [ev(9)], {"Idempotency-Key": "across"}).status_code == 422
        assert server.stored() == 3
    finally:
        server.stop()


def test_prune_idempotency_deletes_only_old_api_keys(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    server = ApiServer(tmp_path, clock=lambda: now[0])
    try:
        with httpx.Client(base_url=server.url) as c:
            assert post(c, [ev(1)], {"Idempotency-Key": "old"}).status_code == 200
            now[0] += 86400 * 2 + 10
            assert post(c, [ev(2)], {"Idempotency-Key": "new"}).status_code == 200
            from agent.sink import Dedup

            server.outbox.commit_sync([], Dedup("pos:R1", "txn-1", b"x"))  # another namespace: kept
            assert server.outbox.call(lambda conn: prune_idempotency(conn, now[0])) == 1
            assert server.outbox.call(lambda conn: prune_idempotency(conn, now[0])) == 0
            # the pruned key is new again; the kept one still replays
            assert post(c, [ev(3)], {"Idempotency-Key": "old"}).headers.get("idempotent-replayed") is None
            assert post(c, [ev(2)], {"Idempotency-Key": "new"}).headers["idempotent-replayed"] == "true"
        conn = sqlite3.connect(tmp_path / "buffer.db")
        assert conn.execute("SELECT count(*) FROM dedup WHERE ns='pos:R1'").fetchone()[0] == 1
        conn.close()
    finally:
        server.stop()


# ---- the buffer's cap --------------------------------------------------------------------------------------


def test_503_with_retry_after_when_the_cap_refuses(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, max_bytes=64 * 1024)
    try:
        with httpx.Client(base_url=server.url) as c:
            batch = [{"type": "app.fill", "data": {"pad": os.urandom(500).hex()}} for _ in range(10)]  # incompressible
            for _ in range(100):
                r = post(c, batch, {"Idempotency-Key": f"fill-{_}"})
                if r.status_code != 200:
                    break
            assert r.status_code == 503
            assert r.json()["error"] == "buffer_full"
            assert int(r.headers["retry-after"]) > 0
            before = server.stored()
            assert post(c, batch).status_code == 503
            assert server.stored() == before
            # a 503 is not remembered: the same key goes through once there is room
            server.outbox.max_bytes = 1 << 30
            assert post(c, batch, {"Idempotency-Key": f"fill-{_}"}).headers.get("idempotent-replayed") is None
            assert c.get("/healthz").status_code == 200
    finally:
        server.stop()


# ---- concurrency -----------------------------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_ids(api: ApiServer) -> None:
    def worker(w: int) -> list[list[str]]:
        out = []
        with httpx.Client(base_url=api.url, timeout=30) as c:
            for r in range(15):
                resp = post(c, [ev(w * 1000 + r * 100 + i) for i in range(40)])
                assert resp.status_code == 200
                out.append(resp.json()["ids"])
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    ids = [i for per_worker in results for batch in per_worker for i in batch]
    assert len(ids) == len(set(ids)) == 8 * 15 * 40
    stored = {e["id"]: e for e in api.envelopes()}
    assert set(stored) == set(ids)
    for per_worker in results:  # a request's events are consecutive in seq, in request order
        for batch in per_worker:
            seqs = [stored[i]["seq"] for i in batch]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# ---- the other routes -------------------------------------------------------------------------------------


def test_healthz_metrics_status_and_drain(api: ApiServer, client: httpx.Client) -> None:
    assert post(client, [ev(1), ev(2)]).status_code == 200
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["ok"] is True
    assert r.json()["mqtt"]["connected"] is False  # no broker: said in the body, not by a 503
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'store_agent_events_in_total{stream="app"} 2' in r.text
    assert "store_agent_buffer_events 2" in r.text
    r = client.get("/v1/status")
    assert r.json()["buffer"]["events"] == 2
    r = client.post("/v1/drain")
    assert r.status_code == 200
    assert r.json()["buffer"]["events"] == 2
    assert client.get("/nope").json() == {"error": "not_found"}
    assert client.get("/v1/events").status_code == 405


def test_healthz_is_503_once_the_buffer_writer_is_gone(api: ApiServer, client: httpx.Client) -> None:
    api.outbox.close()
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["ok"] is False
    api.outbox.start()  # for the fixture's teardown


# ---- timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-23T09:15:02.125+01:00", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23T08:15:02.125Z", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23t08:15:02.125z", "2026-11-23T08:15:02.125Z"),
        ("2026-11-23 08:15:02Z", "2026-11-23T08:15:02.000Z"),
        ("2026-11-23T08:15:02.1Z", "2026-11-23T08:15:02.100Z"),
        ("2026-11-23T08:15:02.123456789-00:00", "2026-11-23T08:15:02.123Z"),
        ("2026-01-01T00:30:00+05:45", "2025-12-31T18:45:00.000Z"),
        ("2024-02-29T23:59:59.999-23:59", "2024-03-01T23:58:59.999Z"),
    ],
)
def test_rfc3339_is_converted_to_utc_milliseconds(text: str, expected: str) -> None:
    assert rfc3339_utc_ms(text) == expected


@pytest.mark.parametrize(
    "text",
    ["2026-11-23T08:15:02", "2026-11-23", "2026-11-23T08:15Z", "2026-11-23T24:00:00Z", "2026-11-23T08:15:60Z",
     "2026-02-29T08:15:02Z", "2026-11-23T08:15:02+0100", "2026-11-23T08:15:02.Z", "20261123T081502Z",
     "2026-11-23T08:15:02+24:00", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
     "٢٠٢٦-11-23T08:15:02Z", "2026-11-23T08:15:02Z\n", ""],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        rfc3339_utc_ms(text)


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    offset_min=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
    digits=st.integers(min_value=0, max_value=9),
)
def test_conversion_agrees_with_datetime_and_the_envelope_module(moment: datetime, offset_min: int,
                                                                 digits: int) -> None:
    local = moment.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    frac = f"{local.microsecond:06d}000"[:digits]
    sign = "-" if offset_min < 0 else "+"
    text = (f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:{local.minute:02d}:"
            f"{local.second:02d}{'.' + frac if digits else ''}{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}")
    utc = local.replace(microsecond=0).astimezone(UTC)
    expected = (f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
                f".{(frac + '000')[:3]}Z")
    assert rfc3339_utc_ms(text) == expected
    if digits in (0, 3, 6):  # the forms datetime.fromisoformat reads in Python 3.11
        assert utc_ms(text) == expected


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_random_text_raises_only_value_error(text: str) -> None:
    try:
        rfc3339_utc_ms(text)
    except ValueError:
        pass
