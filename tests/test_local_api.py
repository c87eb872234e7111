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
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from agent.buffer import Outbox, read_chunks
from agent.buffer.idempotency import prune_idempotency
from agent.config import AgentConfig
from agent.health import HealthBoard
from agent.httpserver import Limits, server_config
from agent.status import StatusReporter
from agent.uplink import Uplink
from agent.web import make_app
from tests.support.buffer import stored_count, stored_events
from tests.support.mosquitto import free_port
from tests.support.wait import wait_until

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UUID7 = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class ApiServer:
    """The app served by uvicorn in a thread (its own event loop), over a real Outbox."""

    def __init__(
        self,
        tmp: Path,
        *,
        token: str | None = TOKEN,
        max_bytes: int = 1 << 30,
        streams: list[str] | None = None,
        clock: Any = time.time,
        limits: Limits | None = None,
        api_extra: dict[str, Any] | None = None,
        mqtt: dict[str, Any] | None = None,
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        api: dict[str, Any] = {"listen": f"127.0.0.1:{self.port}"}
        if token is not None:
            (tmp / "token").write_text(token + "\n")
            api["token_file"] = str(tmp / "token")
        if streams is not None:
            api["streams"] = streams
        api.update(api_extra or {})
        self.cfg = AgentConfig.model_validate(
            {
                "agent": {"tenant": "acme", "store": "s1", "id": "a1", "data_dir": str(tmp)},
                "mqtt": mqtt or {"host": None},
                "buffer": {"max_bytes": max(max_bytes, 64 * 1024)},
                "local_api": api,
            }
        )
        self.outbox = Outbox(
            tmp / "buffer.db", tenant="acme", store="s1", agent="a1", max_bytes=max_bytes, clock=clock
        ).start()
        self.uplink = Uplink(self.cfg, self.outbox).start()  # no broker: it waits, as in the agent
        self.reporter = StatusReporter(self.outbox, self.uplink, HealthBoard())
        self.app = app = make_app(self.cfg, self.outbox, self.reporter, self.uplink)
        # the agent's own server set-up (agent.httpserver), on a loop of its own in this thread
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits, loop="asyncio"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.server.started or not self.thread.is_alive(), 10, interval=0.01), (
            "uvicorn did not start"
        )
        assert self.server.started, "uvicorn exited"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.uplink.stop(0.5)
        self.outbox.close()

    def stored(self) -> int:
        """Events committed so far (nothing is sent: no broker)."""
        self.outbox.flush()
        return stored_count(self.outbox.path)

    def envelopes(self) -> list[dict[str, Any]]:
        """Every stored envelope, in seq order."""
        self.outbox.flush()
        return stored_events(self.outbox)


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


JSON = {"Content-Type": "application/json"}


def post(client: httpx.Client, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/v1/events", content=content, headers={**AUTH, **JSON, **(headers or {})}, **kw)


def assert_alive(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert post(client, [ev()]).status_code == 200


# ---- auth ------------------------------------------------------------------------------------------


def test_requests_without_the_right_bearer_token_get_401(api: ApiServer, client: httpx.Client) -> None:
    body = orjson.dumps([ev()])
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ):
        r = client.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.stored() == 0
    assert (
        client.post(
            "/v1/events", content=body, headers={"Authorization": f"bearer {TOKEN}", **JSON}
        ).status_code
        == 200
    )
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


def test_a_json_array_is_committed_and_answered_with_ids_in_order(
    api: ApiServer, client: httpx.Client
) -> None:
    events = [
        {
            "type": "app.checkin",
            "data": {"member": "m-1"},
            "source": "tablet-3",
            "ts": "2026-11-23T09:15:02.125+01:00",
        },
        {"type": "app.checkout", "data": {}},
        {
            "type": "app.note",
            "data": {"text": "é✓", "nested": {"a": [1, 2.5, None, True]}},
            "ts": "2026-11-23T08:15:02Z",
        },
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


def test_every_bad_event_is_listed_by_index_and_nothing_is_committed(
    api: ApiServer, client: httpx.Client
) -> None:
    events: list[Any] = [
        ev(0),
        {"type": "pos.sale", "data": {}},  # 1: a device stream
        {"type": "app.x"},  # 2: no data
        {"type": "app.x", "data": [1, 2]},  # 3: data not an object
        ev(4),
        {"type": "app.x", "data": {}, "ts": "2026-11-23T09:15:02"},  # 5: no offset
        {"type": "app.x", "data": {}, "ts": "2026-02-30T09:15:02Z"},  # 6: no such day
        "app.x",  # 7: not an object
        {"type": "appx", "data": {}},  # 8: not stream.name
        {"type": "app.x", "data": {}, "source": 5},  # 9: source not a string
        {"type": "app.x", "data": {}, "extra": 1},  # 10: unknown field
        {"data": {}},  # 11: no type
        {"type": "app.", "data": {}},  # 12: empty name
        {"type": "app.x", "data": "{}"},  # 13: data a string
        {"type": "app.x", "data": {}, "ts": 1764000000},  # 14: ts a number
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
    assert r.json()["errors"] == [
        {"index": 1, "reason": "unknown field 'timestamp' (an event has type, data, source, ts)"}
    ]
    assert api.stored() == 0


def test_a_day_that_does_not_exist_alone_is_refused(api: ApiServer, client: httpx.Client) -> None:
    r = post(client, [ev(0), ev(1, ts="2026-04-31T09:15:02Z")])
    assert r.status_code == 400
    assert [e["index"] for e in r.json()["errors"]] == [1]
    assert api.stored() == 0


@pytest.mark.parametrize(
    "body",
    [
        b'[{"type": "app.x", "data": {}}',  # truncated
        b'{"type": "app.x", "data": {}}',  # an object, not an array
        b"42",
        b"",
        b"[" * 100_000,  # deeply nested
        b"[" * 100_000 + b"]" * 100_000,
        b'[{"type": "app.x", "data": {"a": "\xff\xfe"}}]',  # invalid UTF-8
        b'[{"type": "app.x", "data": {"a": "\\ud800"}}]',  # a lone surrogate
        b'\xef\xbb\xbf[{"type": "app.x", "data": {}}]',  # a byte order mark
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

    r = client.post("/v1/events", content=chunks(), headers={**AUTH, **JSON})
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"  # the bytes, not the events counted after reading it all
    assert api.stored() == 0
    assert_alive(client)


def test_reading_stops_at_the_limit_without_waiting_for_the_rest(api: ApiServer) -> None:
    """A chunked body that never ends is answered 413 once 4 MiB have arrived: it is not buffered whole."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=20) as s:
        s.sendall(
            f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
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


def test_a_retry_with_the_same_key_gets_the_first_answer_and_commits_nothing(
    api: ApiServer, client: httpx.Client
) -> None:
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
        headers = [
            (b"Authorization", AUTH["Authorization"].encode()),
            (b"Idempotency-Key", key.encode("utf-8")),
            (b"Content-Type", b"application/json"),
        ]
        r = client.post("/v1/events", content=b"[]", headers=headers)
        assert r.status_code == 400, key
        assert r.json()["error"] == "invalid_idempotency_key"


def test_the_same_key_while_the_first_is_being_committed_is_a_409(api: ApiServer) -> None:
    # hold SQLite's write lock so that the first commit waits
    blocker = sqlite3.connect(api.tmp / "buffer.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    body = orjson.dumps([ev(1)])
    headers = {**AUTH, **JSON, "Idempotency-Key": "slow"}
    try:
        with (
            ThreadPoolExecutor(2) as pool,
            httpx.Client(base_url=api.url, timeout=30) as c1,
            httpx.Client(base_url=api.url, timeout=30) as c2,
        ):
            futures = [pool.submit(c.post, "/v1/events", content=body, headers=headers) for c in (c1, c2)]
            # the one that is not in flight answers at once
            assert wait_until(lambda: any(f.done() for f in futures), 20, interval=0.01)
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
            batch = [
                {"type": "app.fill", "data": {"pad": os.urandom(500).hex()}} for _ in range(10)
            ]  # incompressible
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
            # transactions are not acknowledged at the cap: health says so, by its own code
            health = c.get("/healthz")
            assert health.status_code == 503
            assert health.json()["problems"] == [
                {
                    "code": "buffer_full",
                    "message": "buffer commits are refused: buffer full: the disk cap is reached",
                }
            ]
            # a 503 is not remembered: the same key goes through once there is room
            server.outbox.max_bytes = 1 << 30
            again = post(c, batch, {"Idempotency-Key": f"fill-{_}"})
            assert again.status_code == 200 and again.headers.get("idempotent-replayed") is None
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
    r = client.post("/v1/drain", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["buffer"]["events"] == 2
    assert client.get("/nope").json() == {"error": "not_found"}
    assert client.get("/v1/events").status_code == 405


def test_healthz_is_503_once_the_buffer_writer_is_gone(api: ApiServer, client: httpx.Client) -> None:
    api.outbox.close()
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["ok"] is False
    assert [p["code"] for p in r.json()["problems"]] == ["buffer_writer_down"]
    metrics = client.get("/metrics").text
    assert 'store_agent_thread_up{thread="buffer_writer"} 0' in metrics
    assert "store_agent_buffer_writable 0" in metrics
    api.outbox.start()  # for the fixture's teardown


def test_healthz_is_503_while_commits_fail_and_200_again_after(api: ApiServer, client: httpx.Client) -> None:
    metrics = client.get("/metrics").text
    assert "store_agent_buffer_writable 1" in metrics
    assert 'store_agent_thread_up{thread="uplink"} 1' in metrics
    api.outbox.failure = "disk_full: no room left on the device"  # what the writer sets while commits fail
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["problems"] == [
        {"code": "buffer_failing", "message": "buffer commits fail: disk_full: no room left on the device"}
    ]
    assert r.json()["buffer"]["writable"] is False
    assert "store_agent_buffer_writable 0" in client.get("/metrics").text
    api.outbox.failure = None
    assert client.get("/healthz").status_code == 200


def test_healthz_is_503_once_the_uplink_thread_is_gone(api: ApiServer, client: httpx.Client) -> None:
    """Nothing would ever be sent again: that is not a broker outage (which stays a 200)."""
    assert client.get("/healthz").json()["threads"] == {"buffer_writer": True, "uplink": True}
    api.uplink.stop(0.5)
    r = client.get("/healthz")
    assert r.status_code == 503
    assert [p["code"] for p in r.json()["problems"]] == ["uplink_down"]
    assert 'store_agent_thread_up{thread="uplink"} 0' in client.get("/metrics").text


def test_healthz_is_503_once_another_registered_thread_is_gone(api: ApiServer, client: httpx.Client) -> None:
    """The command channel's worker (or any thread the daemon registers) shows like the others."""
    running = {"up": True}
    api.reporter.threads["commands"] = lambda: running["up"]
    assert client.get("/healthz").json()["threads"] == {
        "buffer_writer": True,
        "uplink": True,
        "commands": True,
    }
    assert 'store_agent_thread_up{thread="commands"} 1' in client.get("/metrics").text
    running["up"] = False
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["problems"] == [
        {"code": "commands_down", "message": "the commands thread is not running"}
    ]
    assert 'store_agent_thread_up{thread="commands"} 0' in client.get("/metrics").text


# ---- security: token, Host, origin, media type --------------------------------------------------------------


def test_drain_needs_the_token(api: ApiServer, client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.post("/v1/drain", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
    assert client.post("/v1/drain", headers=AUTH).status_code == 200


def test_the_host_header_must_name_this_server(api: ApiServer, client: httpx.Client) -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host."""
    for host in (
        "evil.example",
        f"evil.example:{api.port}",
        "127.0.0.1",
        f"127.0.0.1:{api.port + 1}",
        f"localhost.evil.example:{api.port}",
        f"0.0.0.0:{api.port}",
    ):
        for method, path in (
            ("GET", "/v1/status"),
            ("GET", "/healthz"),
            ("GET", "/metrics"),
            ("POST", "/v1/drain"),
            ("POST", "/v1/events"),
        ):
            r = client.request(method, path, headers={"Host": host, **AUTH, **JSON}, content=b"[]")
            assert r.status_code == 421, (host, path)
            assert r.json()["error"] == "misdirected_request"
    for host in (
        f"127.0.0.1:{api.port}",
        f"localhost:{api.port}",
        f"LocalHost:{api.port}",
        f"[::1]:{api.port}",
    ):
        assert client.get("/v1/status", headers={"Host": host}).status_code == 200, host
        assert post(client, [ev()], {"Host": host}).status_code == 200, host
    assert api.stored() == 4
    # two Host headers: refused whatever they say
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(
            f"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nHost: evil.example\r\n\r\n".encode()
        )
        assert s.recv(65536).startswith(b"HTTP/1.1 400")


def test_cross_origin_requests_are_refused(api: ApiServer, client: httpx.Client) -> None:
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{api.port + 1}"},
        {"Origin": f"https://127.0.0.1:{api.port}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        r = post(client, [ev()], headers)
        assert r.status_code == 403, headers
        assert r.json()["error"] == "cross_origin"
        assert "access-control-allow-origin" not in r.headers
        assert client.get("/v1/status", headers=headers).status_code == 403
        assert client.post("/v1/drain", headers={**AUTH, **headers}).status_code == 403
    assert api.stored() == 0
    # the server's own origin (a page it serves) and non-browser clients are fine
    assert (
        post(
            client, [ev()], {"Origin": f"http://127.0.0.1:{api.port}", "Sec-Fetch-Site": "same-origin"}
        ).status_code
        == 200
    )
    assert api.stored() == 1


def test_events_must_be_sent_as_json_or_ndjson(api: ApiServer, client: httpx.Client) -> None:
    """A browser's "simple" cross-origin POST (text/plain, a form) needs no preflight: 415."""
    body = orjson.dumps([ev()])
    for media in (
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ):
        headers = {**AUTH} if media is None else {**AUTH, "Content-Type": media}
        r = client.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 415, media
        assert r.json()["error"] == "unsupported_media_type"
    assert api.stored() == 0
    for media in ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON"):
        assert (
            client.post("/v1/events", content=body, headers={**AUTH, "Content-Type": media}).status_code
            == 200
        )
    ndjson = {**AUTH, "Content-Type": "application/x-ndjson"}
    assert client.post("/v1/events", content=orjson.dumps(ev()), headers=ndjson).status_code == 200
    assert api.stored() == 4


# ---- data that cannot travel as it came ----------------------------------------------------------------------


def nested(levels: int) -> bytes:
    """`data` with `levels` levels of objects and arrays: {"a": [[...]]}."""
    return b'{"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


@pytest.mark.parametrize("ndjson", [False, True])
@pytest.mark.parametrize("levels", [255, 256, 600, 1021])
def test_data_nested_too_deep_is_a_400_naming_the_event(
    api: ApiServer, client: httpx.Client, ndjson: bool, levels: int
) -> None:
    good = orjson.dumps(ev(0))
    deep = b'{"type": "app.deep", "data": ' + nested(levels) + b"}"
    if ndjson:
        r = post(client, good + b"\n" + deep + b"\n" + good, {"Content-Type": "application/x-ndjson"})
    else:
        r = post(client, b"[" + good + b"," + deep + b"," + good + b"]")
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_events"
    assert [e["index"] for e in r.json()["errors"]] == [1]
    assert "nested too deep" in r.json()["errors"][0]["reason"]
    assert api.stored() == 0


def test_data_254_levels_deep_is_kept(api: ApiServer, client: httpx.Client) -> None:
    r = post(client, b'[{"type": "app.deep", "data": ' + nested(254) + b"}]")
    assert r.status_code == 200
    assert orjson.dumps(api.envelopes()[0]["data"]) == nested(254)


WIDE = [
    b"123456789012345678901234567890",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"-123456789012345678901234567890",
]


@pytest.mark.parametrize("ndjson", [False, True])
@pytest.mark.parametrize("number", WIDE)
def test_integers_beyond_64_bits_are_a_400_naming_the_event(
    api: ApiServer, client: httpx.Client, ndjson: bool, number: bytes
) -> None:
    """orjson reads them as floats: 1.2345678901234568e+29 would arrive upstream instead."""
    events = [
        orjson.dumps(ev(0)),
        b'{"type": "app.x", "data": {"ok": 1}}',
        b'{"type": "app.big", "data": {"order": {"lines": [1, ' + number + b"]}}}",
    ]
    if ndjson:
        r = post(client, b"\n".join(events), {"Content-Type": "application/x-ndjson"})
    else:
        r = post(client, b"[" + b",\n ".join(events) + b"]")
    assert r.status_code == 400, r.text
    assert r.json()["errors"] == [{"index": 2, "reason": r.json()["errors"][0]["reason"]}]
    assert "64 bits" in r.json()["errors"][0]["reason"]
    assert api.stored() == 0


@pytest.mark.parametrize("ndjson", [False, True])
def test_integers_at_the_64_bit_limits_keep_every_digit(
    api: ApiServer, client: httpx.Client, ndjson: bool
) -> None:
    data = (
        b'{"u": 18446744073709551615, "i": -9223372036854775808, "s": "123456789012345678901234567890", '
        b'"f": 1.2345678901234568e+29}'
    )
    event = b'{"type": "app.edge", "data": ' + data + b"}"
    if ndjson:
        r = post(client, event + b"\n", {"Content-Type": "application/x-ndjson"})
    else:
        r = post(client, b"[" + event + b"]")
    assert r.status_code == 200, r.text
    api.outbox.flush()
    conn = sqlite3.connect(api.tmp / "buffer.db")
    try:
        (chunk,) = read_chunks(conn, 0, 10)  # the stored body, decompressed as the uplink sends it
    finally:
        conn.close()
    body = chunk.body
    assert b'"u":18446744073709551615' in body
    assert b'"i":-9223372036854775808' in body
    assert b'"s":"123456789012345678901234567890"' in body


def test_an_event_the_broker_could_never_take_is_a_413_naming_it(tmp_path: Path) -> None:
    """`uplink.max_event_bytes` (here `batch_max_bytes`, 4096): one byte of envelope more is refused."""
    server = ApiServer(tmp_path, mqtt={"host": None, "batch_max_bytes": 4096})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:

            def event(pad: int) -> dict[str, Any]:
                return {"type": "app.pad", "source": "tablet-ü", "data": {"pad": "x" * pad}}

            assert post(c, [event(10)]).status_code == 200
            stored = server.envelopes()[0]
            # the door counts seq as 19 digits (its value is known only at commit)
            fits = 10 + 4096 - len(orjson.dumps(stored)) - (19 - len(str(stored["seq"])))
            assert server.uplink.max_event_bytes == 4096
            r = post(c, [event(1), event(fits + 1), event(2), event(100_000)])
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "event_too_large"
            assert [e["index"] for e in r.json()["errors"]] == [1, 3]
            assert "4096" in r.json()["errors"][0]["reason"]
            assert server.stored() == 1  # nothing of the refused request
            assert post(c, [event(fits)]).status_code == 200
            assert max(len(orjson.dumps(e)) for e in server.envelopes()) <= 4096
    finally:
        server.stop()


# ---- the web server's limits, over real sockets ----------------------------------------------------------------


def recv_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout` passes without a close (False)."""
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return out, True
            out += data
    except ConnectionResetError:
        return out, True
    except TimeoutError:
        return out, False


@pytest.mark.parametrize("kind", ["many headers", "one endless header", "endless url"])
def test_endless_headers_are_cut_off(api: ApiServer, client: httpx.Client, kind: str) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        if kind == "endless url":
            s.sendall(b"GET /")
            filler = b"a" * 65536
        else:
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\n".encode())
            filler = (
                b"X-Filler: " + b"a" * 1000 + b"\r\n"
                if kind == "many headers"
                else b"X-Endless: " + b"a" * 65536
            )
        sent = 0
        try:
            while sent < 256 * 1024 * 1024:  # bounded: without a limit the server reads all of it
                s.sendall(filler)
                sent += len(filler)
        except OSError:  # the server answered and closed
            pass
        answer, closed = recv_all(s, 10)
    assert sent < 64 * 1024 * 1024, "the server kept reading the headers"
    assert closed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert_alive(client)


def test_slow_headers_are_closed_after_the_header_timeout(tmp_path: Path) -> None:
    # keep-alive longer than the bounded waits below: only the header timeout can close these
    server = ApiServer(tmp_path, limits=Limits(header_timeout_s=1.0, keep_alive_s=60))
    try:
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Slow: ".encode())
        silent = socket.create_connection(("127.0.0.1", server.port))  # sends nothing at all
        with half, silent:
            answer, closed = recv_all(half, 30)
            assert closed, "a half-request was kept open"
            assert answer.startswith(b"HTTP/1.1 408")
            assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
            assert recv_all(silent, 30)[1], "a silent connection was kept open"
        # a keep-alive connection that begins its next request and stalls is closed the same way
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
            s.settimeout(10)
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /healthz HT")
            answer, closed = recv_all(s, 30)
            assert closed
            assert b"HTTP/1.1 408 " in first + answer
        # and one that begins its next request in the same packet as the first (pipelined)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(
                f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\nGET /healthz HT".encode()
            )
            answer, closed = recv_all(s, 30)
            assert closed
            assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408 " in answer
        with httpx.Client(base_url=server.url) as c:
            assert_alive(c)
    finally:
        server.stop()


def test_half_requests_beyond_the_connection_cap_never_lock_out_a_client(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, limits=Limits(max_connections=20))
    halves: list[socket.socket] = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
            halves.append(s)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(3):
                assert_alive(c)
        # the server keeps at most its cap: the oldest half-requests were closed
        closed = sum(recv_all(s, 0.5)[1] for s in halves[:30])
        assert closed == 30
    finally:
        for s in halves:
            s.close()
        server.stop()


def test_a_stalled_body_is_closed_after_the_body_timeout(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, limits=Limits(body_timeout_s=1.0))
    try:
        for framing in ("Transfer-Encoding: chunked", "Content-Length: 100000"):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(
                    f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                    f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
                )
                part = b"[" + b" " * 999
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if "chunked" in framing else part)
                assert recv_all(s, 30)[1], f"a stalled body ({framing}) was kept open"
        with httpx.Client(base_url=server.url) as c:
            assert_alive(c)
        assert server.stored() == 1
    finally:
        server.stop()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_bodies_beyond_the_shared_budget_are_refused(tmp_path: Path, framing: str) -> None:
    """8 bodies of max_body_bytes may be held at once, all requests together; the 9th gets 503."""
    server = ApiServer(tmp_path, api_extra={"max_body_bytes": 64 * 1024})
    held: list[socket.socket] = []
    try:
        body = b"[" + b" " * 60_000 + b"]"

        def open_body(s: socket.socket, part: bytes) -> None:
            framing_header = (
                "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {len(body)}"
            )
            s.sendall(
                f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"{framing_header}\r\n\r\n".encode()
            )
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if framing == "chunked" else part)

        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", server.port))
            open_body(s, body[:-1])  # all but the last byte: the request is held open
            held.append(s)
        budget = server.app.app.routes[0].endpoint.__self__.budget  # the EventApi's
        assert wait_until(lambda: budget.held >= 8 * 60_001)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            open_body(s, body[:-1])
            answer, closed = recv_all(s, 20)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"retry-after: 1" in answer.lower()
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "busy"
        assert closed
        for s in held:
            s.close()
        held.clear()
        with httpx.Client(base_url=server.url, timeout=10) as c:  # given back once those requests end
            assert wait_until(lambda: post(c, [ev()]).status_code == 200, timeout=20)
    finally:
        for s in held:
            s.close()
        server.stop()
