"""store-agent-ingest end to end: the real executable, a real mosquitto, the real PostgreSQL.

Each test has its own broker on a free loopback port and its own database (`ingest_test_<random>`,
dropped afterwards) on the machine's PostgreSQL at 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from ingest import db as ingest_db
from ingest.config import load as load_config
from ingest.envelope import Parsed, parse_message
from ingest.gaps import seq_gaps
from tests.support.fleet import Publisher, SimAgent
from tests.support.ingestproc import (
    STORE_AGENT_INGEST,
    IngestProcess,
    kill_all,
    landed_count,
    query,
    write_ingest_config,
)
from tests.support.mosquitto import Mosquitto
from tests.support.pg import scratch_database
from tests.support.wait import wait_until


@pytest.fixture(autouse=True)
def _no_ingest_left_running() -> Iterator[None]:
    yield
    kill_all()


@pytest.fixture
def pgdb() -> Iterator[str]:
    try:
        with scratch_database() as dsn:
            yield dsn
    except psycopg.OperationalError as exc:  # pragma: no cover - the set-up starts one
        pytest.fail(f"no PostgreSQL on 127.0.0.1:5432 (scripts/setup.sh starts one): {exc}")


def fleet(
    n_agents: int, batches: int, size: int, seed: int = 1
) -> tuple[list[tuple[str, bytes]], set[tuple[str, int]]]:
    """Messages from `n_agents` simulated agents, interleaved, and the (agent, seq) set they carry."""
    agents = [SimAgent("acme", f"s{i % 3}", f"a{i}", seed=seed + i) for i in range(n_agents)]
    per_agent = [[(a.topic(), a.payload(a.events(size))) for _ in range(batches)] for a in agents]
    messages = [m for round_ in zip(*per_agent, strict=True) for m in round_]
    expected = {(a.agent, s) for a in agents for s in range(1, a.seq + 1)}
    return messages, expected


def assert_landed_once(dsn: str, expected: set[tuple[str, int]]) -> None:
    rows = query(dsn, "SELECT agent, seq, id FROM store_events")
    assert len(rows) == len({r[2] for r in rows}), "an id landed twice"
    assert {(a, s) for a, s, _ in rows} == expected and len(rows) == len(expected)
    assert query(dsn, "SELECT * FROM store_seq_gaps") == []
    assert query(dsn, "SELECT count(*) FROM store_ingest_rejects") == [(0,)]


def test_two_instances_one_killed_mid_stream(tmp_path: Path, broker: Mosquitto, pgdb: str) -> None:
    messages, expected = fleet(n_agents=6, batches=25, size=100)
    rng = random.Random(7)
    messages += rng.sample(messages, 20)  # duplicates injected: whole messages sent twice
    rng.shuffle(messages)
    one = IngestProcess(
        tmp_path, write_ingest_config(tmp_path / "i1.toml", broker.port, pgdb, "ingest-1")
    ).start()
    two = IngestProcess(
        tmp_path, write_ingest_config(tmp_path / "i2.toml", broker.port, pgdb, "ingest-2")
    ).start()
    one.wait_subscribed()
    two.wait_subscribed()
    pub = Publisher(broker.port, "fleet-pub")
    first, rest = messages[:40], messages[40:]
    sender = threading.Thread(target=pub.send_all, args=(rest, 60.0), daemon=True)
    try:
        pub.send_all(first)
        assert wait_until(lambda: landed_count(pgdb) >= 2000, 30), one.tail() + two.tail()
        # hold both instances inside a commit, so that the one killed has messages in hand: had it
        # acknowledged them on receipt rather than after its commit, they would be lost
        with psycopg.connect(pgdb) as blocker:
            blocker.execute("LOCK TABLE ingest_event_ids IN EXCLUSIVE MODE")
            sender.start()
            # each instance has a commit waiting (each has `writers` connections: 1 or 2 may wait)
            assert wait_until(
                lambda: (
                    query(
                        pgdb,
                        "SELECT DISTINCT application_name FROM pg_stat_activity "
                        "WHERE application_name LIKE 'store-agent-ingest:%%' AND wait_event_type = 'Lock' "
                        "ORDER BY 1",
                    )
                    == [("store-agent-ingest:ingest-1",), ("store-agent-ingest:ingest-2",)]
                ),
                20,
            ), one.tail() + two.tail()
            one.kill9()  # mid-stream: whatever it had received and not acknowledged stays in its session
            blocker.rollback()
        subscribed = one.subscriptions()
        one = IngestProcess(tmp_path, one.config).start()  # systemd's Restart=: the same client_id
        one.wait_subscribed(subscribed + 1)
        assert "(resumed session)" in one.tail(), one.tail()
        sender.join(60)
        assert not sender.is_alive()
        assert wait_until(lambda: landed_count(pgdb) >= len(expected), 40), (landed_count(pgdb), one.tail())
        assert_landed_once(pgdb, expected)
    finally:
        pub.close()
        codes = (one.stop(), two.stop())
    assert codes == (0, 0), one.tail() + two.tail()
    assert "stopped: messages=" in two.tail()


def test_broker_restarted_under_load(tmp_path: Path, pgdb: str) -> None:
    work = tmp_path / "mosquitto"
    work.mkdir()
    broker = Mosquitto(work, extra_conf=f"persistence true\npersistence_location {work}/\n").start()
    try:
        before, expected_before = fleet(n_agents=4, batches=50, size=50, seed=11)
        after, expected_after = fleet(n_agents=4, batches=5, size=50, seed=11)
        # the same agents go on numbering after the restart: rebuild them past what `before` used
        agents = [SimAgent("acme", f"s{i % 3}", f"a{i}", seed=100 + i) for i in range(4)]
        for agent in agents:
            agent.seq = 50 * 50
        after = [(a.topic(), a.payload(a.events(50))) for _ in range(5) for a in agents]
        expected = expected_before | {(a.agent, s) for a in agents for s in range(2501, a.seq + 1)}
        config = write_ingest_config(
            tmp_path / "i1.toml", broker.port, pgdb, "ingest-1", "receive_maximum = 2\nbatch_events = 200\n"
        )
        ingest = IngestProcess(tmp_path, config).start()
        ingest.wait_subscribed()
        pub = Publisher(broker.port, "fleet-pub")
        pub.send_all(before)  # all accepted: a backlog now waits in the ingest's session
        assert wait_until(lambda: landed_count(pgdb) > 0, 20), ingest.tail()
        broker.stop()  # under load: messages in flight to the ingest, unacknowledged, and queued
        broker.start()
        # mosquitto forgets shared subscriptions when it restarts: the stream flows again only
        # because the ingest subscribes on every connect. A probe (one event, resent until it lands)
        # shows it has; what is published before that goes to no one, which is the broker's doing.
        probe = SimAgent("acme", "s0", "probe", seed=99)
        probe_message = (probe.topic(), probe.payload(probe.events(1)))

        def probe_landed() -> bool:
            pub.send_all([probe_message])
            return query(pgdb, "SELECT count(*) FROM store_events WHERE agent = 'probe'") == [(1,)]

        assert wait_until(probe_landed, 30, interval=0.5), ingest.tail()
        expected.add(("probe", 1))
        assert "(resumed session)" in ingest.tail(), ingest.tail()  # its backlog survived the restart
        pub.send_all(after)
        assert wait_until(lambda: landed_count(pgdb) >= len(expected), 40), (
            landed_count(pgdb),
            ingest.tail(),
        )
        assert_landed_once(pgdb, expected)
        pub.close()
        assert ingest.stop() == 0, ingest.tail()
    finally:
        broker.stop()


def _send(port: int, messages: list[tuple[str, bytes]]) -> None:
    pub = Publisher(port, "one-shot")
    try:
        pub.send_all(messages)
    finally:
        pub.close()


def _env(n: int, agent: str = "a1", **over: Any) -> dict[str, Any]:
    e = {
        "id": f"0193a5f0-7c1e-7d2a-9b1f-{agent.encode().hex():0>6}{n:06x}",
        "seq": n,
        "ts": "2026-11-23T08:15:02.125Z",
        "type": "pos.sale",
        "source": "pos:front-1",
        "tenant": "acme",
        "store": "s1",
        "agent": agent,
        "data": {"n": n},
    }
    e.update(over)
    return e


def test_malformed_payloads_duplicates_and_gaps(tmp_path: Path, broker: Mosquitto, pgdb: str) -> None:
    ingest = IngestProcess(
        tmp_path, write_ingest_config(tmp_path / "i1.toml", broker.port, pgdb, "ingest-1")
    ).start()
    ingest.wait_subscribed()
    topic = "retail/acme/s1/a1/up/pos"
    first = orjson.dumps({"agent": "a1", "events": [_env(n) for n in (1, 2, 3, 6, 7)]})
    _send(broker.port, [(topic, first)])
    assert wait_until(lambda: landed_count(pgdb) == 5, 20), ingest.tail()
    received_first = query(pgdb, "SELECT id, received_at, data FROM store_events ORDER BY seq")

    bad_texts = [
        orjson.dumps(_env(8, id="not-a-uuid")).decode(),
        '{"id": "0193a5f0-7c1e-7d2a-9b1f-000000000009",\n "seq": "9"}',
        orjson.dumps(_env(10, ts="2026-11-23 08:15:02")).decode(),
        orjson.dumps(_env(11, store="s2")).decode(),
    ]
    mixed = (
        '{"agent": "a1", "events": ['
        + ", ".join(
            [
                orjson.dumps(_env(12)).decode(),
                *bad_texts,
                orjson.dumps(_env(3, data={"n": "changed"})).decode(),
            ]
        )
        + "]}"
    ).encode()
    not_batches = [
        (topic, b"\x00\xffnot json"),
        (topic, b'{"events": "no"}'),
        (topic, orjson.dumps({"agent": "a9", "events": [_env(13)]})),
    ]
    # another agent: seq 4..5 dropped by its buffer (reported at seq 6), 9 lost without a report
    a2 = [_env(n, agent="a2") for n in (1, 2, 3, 7, 8, 10)]
    a2.insert(3, _env(6, agent="a2", type="system.dropped", data={"reason": "buffer_cap", "count": 2}))
    a2_topic = "retail/acme/s1/a2/up/system"
    _send(
        broker.port, [(topic, first), (topic, mixed), *not_batches, (a2_topic, orjson.dumps({"events": a2}))]
    )
    assert wait_until(lambda: query(pgdb, "SELECT count(*) FROM store_ingest_rejects")[0][0] == 7, 20), (
        ingest.tail()
    )
    assert wait_until(lambda: landed_count(pgdb) == 13, 20), ingest.tail()

    # first copy wins, with its received_at; the resent copies changed nothing
    assert (
        query(
            pgdb,
            "SELECT id, received_at, data FROM store_events WHERE agent = 'a1' AND seq <= 7 ORDER BY seq",
        )
        == received_first
    )
    rejects = query(pgdb, "SELECT topic, payload, reason FROM store_ingest_rejects ORDER BY reason, payload")
    kept = sorted((bytes(p), t) for t, p, _ in rejects)
    assert kept == sorted([(t.encode(), topic) for t in bad_texts] + [(p, t) for t, p in not_batches])
    reasons = " | ".join(r for _, _, r in rejects)
    for word in (
        "id is not a UUID",
        "seq is not an integer",
        "ts is not RFC 3339",
        "store differs",
        "not a batch: not JSON",
        "`events` is not a list",
        "`agent` differs",
    ):
        assert word in reasons

    gaps = query(
        pgdb,
        "SELECT tenant, store, agent, after_seq, before_seq, missing, explained "
        "FROM store_seq_gaps ORDER BY agent, after_seq",
    )
    assert gaps == [
        ("acme", "s1", "a1", 3, 6, 2, False),
        ("acme", "s1", "a1", 7, 12, 4, False),
        ("acme", "s1", "a2", 3, 6, 2, True),
        ("acme", "s1", "a2", 8, 10, 1, False),
    ]
    for agent in ("a1", "a2"):  # the view agrees with the pure rule
        seqs = [s for (s,) in query(pgdb, "SELECT seq FROM store_events WHERE agent = %s", agent)]
        reports = query(
            pgdb,
            "SELECT seq, (data->>'count')::int FROM store_events "
            "WHERE agent = %s AND type = 'system.dropped'",
            agent,
        )
        assert [(g[3], g[4], g[5], g[6]) for g in gaps if g[2] == agent] == [
            (g.after_seq, g.before_seq, g.missing, g.explained) for g in seq_gaps(seqs, reports)
        ]
    columns = query(
        pgdb,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'store_seq_gaps' ORDER BY ordinal_position",
    )
    assert columns[:6] == [
        ("tenant", "text"),
        ("store", "text"),
        ("agent", "text"),
        ("after_seq", "bigint"),
        ("before_seq", "bigint"),
        ("missing", "bigint"),
    ]
    assert ingest.stop() == 0, ingest.tail()


def test_instances_starting_together_migrate_once(pgdb: str) -> None:
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with psycopg.connect(pgdb) as conn:
                ingest_db.migrate(conn)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert query(pgdb, "SELECT version FROM ingest_schema") == [(1,)]
    columns = query(
        pgdb,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'store_events' ORDER BY ordinal_position",
    )
    assert columns == [
        ("id", "uuid"),
        ("tenant", "text"),
        ("store", "text"),
        ("agent", "text"),
        ("seq", "bigint"),
        ("type", "text"),
        ("source", "text"),
        ("ts", "timestamp with time zone"),
        ("data", "jsonb"),
        ("received_at", "timestamp with time zone"),
    ]


def _run(
    config: Path, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORE_AGENT_INGEST, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("toml", "env", "says"),
    [
        (None, {}, "no such file"),
        ('[mqtt]\nhost = "127.0.0.1"\n[ingest]\ndsn = "x"\ncolor = 1\n', {}, "ingest.color: unknown key"),
        (
            '[mqtt]\nhost = "127.0.0.1"\n[ingest]\ndsn = "x"\ndsn_file = "/y"\n',
            {},
            "exactly one of dsn and dsn_file",
        ),
        (
            '[mqtt]\nhost = "127.0.0.1"\n[ingest]\ndsn = "x"\n',
            {"STORE_AGENT_INGEST__MQTT__PORT": "abc"},
            "mqtt.port",
        ),
        ('[mqtt]\nhost = "10.1.2.3"\ntls = false\n[ingest]\ndsn = "x"\n', {}, "insecure_plaintext"),
        (
            '[mqtt]\nhost = "127.0.0.1"\n[ingest]\ndsn_file = "/nonexistent/ingest.dsn"\n',
            {},
            "cannot read secret",
        ),
        ("[mqtt\n", {}, "TOML syntax error"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, toml: str | None, env: dict[str, str], says: str
) -> None:
    config = tmp_path / "ingest.toml"
    if toml is not None:
        config.write_text(toml)
    result = _run(config, env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and says in result.stderr and "Traceback" not in result.stderr
    named = "/nonexistent/ingest.dsn" if "/nonexistent" in (toml or "") else config
    assert result.stderr.startswith(f"store-agent-ingest: {named}")  # the file at fault


def test_env_overrides_the_file_and_an_unreachable_database_exits_1(
    tmp_path: Path, broker: Mosquitto, pgdb: str
) -> None:
    config = write_ingest_config(
        tmp_path / "i1.toml", broker.port, pgdb.replace("dbname=", "dbname=nosuch_"), "ingest-1"
    )
    result = _run(config)
    assert result.returncode == 1 and "cannot use PostgreSQL" in result.stderr.splitlines()[-1]
    ingest = IngestProcess(tmp_path, config, env={"STORE_AGENT_INGEST__INGEST__DSN": pgdb}).start()
    ingest.wait_subscribed()
    assert ingest.stop() == 0


def test_retention_drops_old_days_and_their_ids(pgdb: str) -> None:
    agent = SimAgent("acme", "s1", "a1")
    old, new = (
        agent.events(3, now_ms=1_700_000_000_000),
        agent.events(2, now_ms=1_800_000_000_000),
    )  # 2023, 2027
    parsed = Parsed()
    parse_message(agent.topic(), agent.payload(old + new), "retail", "2026-12-08T00:00:00Z", parsed)
    writer = ingest_db.Writer(pgdb)
    writer.open()
    try:
        assert writer.write(parsed.rows, parsed.days, parsed.rejects) == 5
        dropped = writer.drop_older_than(30, date(2027, 1, 20))
        assert "ingest_events_20231114" in dropped and "ingest_events_20270115" not in dropped
        assert [s for (s,) in query(pgdb, "SELECT seq FROM store_events ORDER BY seq")] == [4, 5]
        assert query(pgdb, "SELECT count(*) FROM ingest_event_ids") == [(2,)]
    finally:
        writer.close()


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parent.parent / "config" / "ingest.toml")
    assert cfg.ingest.group == "ingest" and cfg.mqtt.tls and cfg.ingest.dsn_file is not None


def test_a_message_postgresql_refuses_is_kept_whole_and_the_rest_lands(
    tmp_path: Path, broker: Mosquitto, pgdb: str
) -> None:
    ingest = IngestProcess(
        tmp_path, write_ingest_config(tmp_path / "i1.toml", broker.port, pgdb, "ingest-1", batch_wait_ms=500)
    ).start()
    ingest.wait_subscribed()
    # a database rule the envelope checks cannot know about: it refuses one event
    query(
        pgdb,
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN IF NEW.data ? 'poison' THEN RAISE EXCEPTION 'poisoned' USING ERRCODE = '22000'; END IF;
                   RETURN NEW; END $$""",
    )
    query(
        pgdb,
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON ingest_events FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    agents = [SimAgent("acme", "s1", f"a{i}", seed=i) for i in range(3)]
    messages = [(a.topic(), a.payload(a.events(20))) for a in agents]
    poisoned = agents[1].events(1)
    poisoned[0]["data"] = {"poison": True}
    bad = (agents[1].topic(), agents[1].payload(poisoned))
    _send(broker.port, [messages[0], bad, messages[1], messages[2]])
    assert wait_until(lambda: landed_count(pgdb) == 60, 20), ingest.tail()
    assert wait_until(lambda: query(pgdb, "SELECT count(*) FROM store_ingest_rejects") == [(1,)], 20), (
        ingest.tail()
    )
    [(topic, payload, reason)] = query(pgdb, "SELECT topic, payload, reason FROM store_ingest_rejects")
    assert (topic, bytes(payload)) == bad and "database refused it" in reason and "poisoned" in reason
    assert ingest.stop() == 0, ingest.tail()


def test_a_day_dropped_by_another_instance_is_made_again(pgdb: str) -> None:
    agent = SimAgent("acme", "s1", "a1")
    one, two = ingest_db.Writer(pgdb), ingest_db.Writer(pgdb)
    one.open()
    two.open()

    def write_two_events(writer: ingest_db.Writer) -> int:
        """Two new events of 2023-11-14 (the agent's next seqs), written by `writer`."""
        parsed = Parsed()
        parse_message(
            agent.topic(),
            agent.payload(agent.events(2, now_ms=1_700_000_000_000)),
            "retail",
            "2026-12-08T00:00:00Z",
            parsed,
        )
        return writer.write(parsed.rows, parsed.days, parsed.rejects)

    try:
        for writer in (one, two):
            assert write_two_events(writer) == 2
        one.drop_older_than(1, date(2023, 12, 1))  # `two` still believes in 2023-11-14
        assert write_two_events(two) == 2
        assert [s for (s,) in query(pgdb, "SELECT seq FROM store_events ORDER BY seq")] == [5, 6]
    finally:
        one.close()
        two.close()
