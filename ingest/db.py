"""PostgreSQL side of the ingest: schema and migrations, and the one transaction per batch.

Layout (what analysts query is the two views of contract section 10; the tables are ours):

- `ingest_events`: every event once, range-partitioned by day of `ts` (UTC), one partition per
  day named `ingest_events_YYYYMMDD`, created on demand (today's and tomorrow's at start).
  Partitioning by `ts` is what O2O queries filter on ("sales of store X last Tuesday"), so they
  prune to the days they ask for; retention drops whole days (`retention_days`).
  Indexes (declared on the parent, so every partition gets them): (tenant, store, type, ts) for
  the O2O queries, (tenant, store, agent, seq) for the gap view.
- `ingest_event_ids(id uuid primary key)`: the dedup ledger. A unique index on a partitioned
  table must contain the partition key, so `id` cannot be unique in `ingest_events` on its own
  (`(id, ts)` would be, but a copy of an event is only a copy if it has the same id, whatever
  its ts). The alternative, partitioning by the time embedded in the UUIDv7, would make `id`
  unique but lose pruning on `ts`, and trust every publisher's UUID version. The ledger costs one
  small btree insert per event; UUIDv7 ids are time-ordered, so its inserts stay near the right
  edge of the index. With retention, ids older than the oldest kept day are pruned with it.
- `store_ingest_rejects`: what could not land, bytes as they came, with the reason.
- `store_events`, `store_seq_gaps`: the views of the contract. `store_seq_gaps` has one column
  beyond the contract's six, `explained boolean` (see ingest/gaps.py for the rule, which the
  view implements in SQL and the tests check against the pure function).

One transaction per batch. Fast path, when no id of the batch has landed before (the usual
case): inside a savepoint, COPY the batch's ids, sorted, into `ingest_event_ids` and its rows
into `ingest_events`. A unique violation (a redelivery, a duplicate) rolls the savepoint back
and the batch takes the slow path: COPY the rows into a temporary staging table, then
`INSERT INTO ingest_event_ids … ON CONFLICT DO NOTHING RETURNING id` and insert into
`ingest_events` only the events whose id that returned (first copy wins, with its received_at).
Then COPY the rejects and commit. Only then does the caller acknowledge the messages to the
broker. The fast path costs the server about 40% less per event (no staging table, no join).
Two transactions inserting the same id at once (two instances, or two writers of one): the
second waits on the first's uncommitted index entry and then does nothing, so the id still lands
once. Ids are inserted in id order, so two transactions sharing several ids wait on each other in
the same order and cannot deadlock.

Migrations are numbered statements applied in one transaction under
`pg_advisory_xact_lock(MIGRATION_LOCK)`, so instances starting together agree; partition
creation takes the same lock, so two instances needing a new day create it once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta

import psycopg

from ingest.envelope import Reject

log = logging.getLogger("ingest.db")

MIGRATION_LOCK = 0x53_41_49_4E  # "SAIN": the advisory lock key of schema changes
PARTITION_PREFIX = "ingest_events_"

MIGRATIONS: list[str] = [
    # 1: the tables, the indexes and the two views
    """
    CREATE TABLE ingest_event_ids (id uuid PRIMARY KEY);
    CREATE TABLE ingest_events (
        id uuid NOT NULL, tenant text NOT NULL, store text NOT NULL, agent text NOT NULL,
        seq bigint NOT NULL, type text NOT NULL, source text, ts timestamptz NOT NULL,
        data jsonb, received_at timestamptz NOT NULL
    ) PARTITION BY RANGE (ts);
    CREATE INDEX ingest_events_o2o ON ingest_events (tenant, store, type, ts);
    CREATE INDEX ingest_events_agent_seq ON ingest_events (tenant, store, agent, seq);
    CREATE TABLE store_ingest_rejects (
        received_at timestamptz NOT NULL, topic text NOT NULL, payload bytea NOT NULL, reason text NOT NULL
    );
    CREATE INDEX store_ingest_rejects_received_at ON store_ingest_rejects (received_at);
    CREATE VIEW store_events AS
        SELECT id, tenant, store, agent, seq, type, source, ts, data, received_at FROM ingest_events;
    CREATE VIEW store_seq_gaps AS
        WITH ordered AS (
            SELECT tenant, store, agent, seq,
                   lag(seq) OVER (PARTITION BY tenant, store, agent ORDER BY seq) AS prev
            FROM ingest_events
        ), gaps AS (
            SELECT tenant, store, agent, prev AS after_seq, seq AS before_seq, seq - prev - 1 AS missing,
                   sum(seq - prev - 1) OVER (PARTITION BY tenant, store, agent ORDER BY prev) AS missing_so_far
            FROM ordered WHERE seq - prev > 1
        ), drops AS (
            SELECT tenant, store, agent, max(seq) AS last_report,
                   sum(CASE WHEN jsonb_typeof(data->'count') = 'number'
                            THEN (data->>'count')::numeric ELSE 0 END) AS dropped
            FROM ingest_events WHERE type = 'system.dropped' GROUP BY tenant, store, agent
        )
        SELECT g.tenant, g.store, g.agent, g.after_seq, g.before_seq, g.missing,
               coalesce(g.missing_so_far <= d.dropped AND d.last_report >= g.before_seq, false) AS explained
        FROM gaps g LEFT JOIN drops d USING (tenant, store, agent);
    """,
]

_STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS ingest_stage (
    id uuid, tenant text, store text, agent text, seq bigint, type text, source text,
    ts timestamptz, data jsonb, received_at timestamptz
) ON COMMIT DELETE ROWS
"""
_COPY_EVENTS = (
    "COPY ingest_events (id, tenant, store, agent, seq, type, source, ts, data, received_at) FROM STDIN"
)
_LAND = """
WITH fresh AS (
    INSERT INTO ingest_event_ids (id) SELECT id FROM ingest_stage ORDER BY id ON CONFLICT DO NOTHING RETURNING id
)
INSERT INTO ingest_events (id, tenant, store, agent, seq, type, source, ts, data, received_at)
SELECT s.id, s.tenant, s.store, s.agent, s.seq, s.type, s.source, s.ts, s.data, s.received_at
FROM ingest_stage s JOIN fresh USING (id)
"""


APPLICATION_NAME = "store-agent-ingest"


def connect(dsn: str, name: str = APPLICATION_NAME) -> psycopg.Connection:
    """A connection for the ingest (autocommit off: every batch is one explicit transaction).

    `name` is its `application_name`: `store-agent-ingest:{client_id}` for an instance's
    connections, so `pg_stat_activity` tells the instances apart."""
    conn = psycopg.connect(dsn, application_name=name, connect_timeout=10)
    return conn


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema up to date under the advisory lock; returns the version it is at."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version int NOT NULL)")
        row = conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
        version = row[0] if row and row[0] is not None else 0
        for number, sql in enumerate(MIGRATIONS, start=1):
            if number > version:
                conn.execute(sql)  # type: ignore[arg-type]  # our own constant SQL
                conn.execute("INSERT INTO ingest_schema (version) VALUES (%s)", (number,))
                log.info("schema migrated to version %d", number)
        return len(MIGRATIONS)


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


class Writer:
    """One connection, one transaction per batch; knows which day partitions exist."""

    def __init__(self, dsn: str, name: str = APPLICATION_NAME) -> None:
        self.dsn = dsn
        self.name = name
        self.conn: psycopg.Connection | None = None
        self._days: set[date] = set()

    def open(self) -> None:
        """Connect, migrate, make today's and tomorrow's partitions and the staging table."""
        self.close()
        conn = connect(self.dsn, self.name)
        self.conn = conn
        migrate(conn)
        self._days = self._existing_days()
        today = datetime.now(UTC).date()
        self.ensure_days({today, today + timedelta(days=1)})
        with conn.transaction():
            conn.execute(_STAGE)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _existing_days(self) -> set[date]:
        assert self.conn is not None
        with self.conn.transaction():
            rows = self.conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'ingest_events'::regclass"
            ).fetchall()
        days = set()
        for (name,) in rows:
            try:
                days.add(datetime.strptime(name.removeprefix(PARTITION_PREFIX), "%Y%m%d").date())
            except ValueError:
                continue
        return days

    def ensure_days(self, days: Iterable[date]) -> None:
        """Create the day partitions not known yet (under the lock; idempotent across instances)."""
        missing = sorted(set(days) - self._days)
        if not missing:
            return
        assert self.conn is not None
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            for day in missing:
                self.conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF ingest_events "  # noqa: S608
                    f"FOR VALUES FROM ('{day.isoformat()} 00:00+00') TO ('{(day + timedelta(days=1)).isoformat()} 00:00+00')"
                )
        self._days.update(missing)

    def write(self, rows: Mapping[str, bytes], days: Iterable[date], rejects: list[Reject]) -> int:
        """Land a batch (COPY lines by event id) in one transaction; returns how many events were new.

        Raises psycopg.Error. The fast path, for a batch none of whose ids has landed before (the
        usual case), COPYs the ids straight into the ledger, sorted, and the rows straight into
        `ingest_events`; a unique violation rolls back to a savepoint and the batch goes through
        the staging table instead, which skips the ids already there.
        """
        days = set(days)
        try:
            return self._write(rows, days, rejects)
        except psycopg.errors.CheckViolation:
            # "no partition of relation found": another instance's retention dropped a day this
            # connection still believed in; learn the partitions again and make what is missing
            assert self.conn is not None
            self._days = self._existing_days()
            return self._write(rows, days, rejects)

    def _write(self, rows: Mapping[str, bytes], days: set[date], rejects: list[Reject]) -> int:
        if self.conn is None:
            self.open()
        self.ensure_days(days)
        conn = self.conn
        assert conn is not None
        with conn.transaction():
            cur = conn.cursor()
            landed = 0
            if rows:
                try:
                    with conn.transaction():  # a savepoint
                        with cur.copy("COPY ingest_event_ids (id) FROM STDIN") as copy:
                            copy.write("\n".join(sorted(rows)).encode() + b"\n")
                        with cur.copy(_COPY_EVENTS) as copy:
                            copy.write(b"".join(rows.values()))
                    landed = len(rows)
                except psycopg.errors.UniqueViolation:
                    with cur.copy("COPY ingest_stage FROM STDIN") as copy:
                        copy.write(b"".join(rows.values()))
                    cur.execute(_LAND)
                    landed = cur.rowcount
            if rejects:
                with cur.copy(
                    "COPY store_ingest_rejects (received_at, topic, payload, reason) FROM STDIN"
                ) as copy:
                    for reject in rejects:
                        copy.write_row((reject.received_at, reject.topic, reject.payload, reject.reason))
        return landed

    def drop_older_than(self, keep_days: int, today: date) -> list[str]:
        """Retention: drop day partitions older than `keep_days` and prune the id ledger with them."""
        assert self.conn is not None
        cutoff = today - timedelta(days=keep_days - 1)
        dropped = []
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            for day in sorted(self._existing_days()):
                if day < cutoff:
                    self.conn.execute(f"DROP TABLE IF EXISTS {partition_name(day)}")
                    dropped.append(partition_name(day))
            if dropped:
                # UUIDv7: the first 48 bits are the Unix time in ms, so this is "ids before cutoff"
                ms = int(datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC).timestamp() * 1000)
                floor = f"{ms:012x}"
                self.conn.execute(
                    "DELETE FROM ingest_event_ids WHERE id < %s::uuid",
                    (f"{floor[:8]}-{floor[8:12]}-0000-0000-000000000000",),
                )
        self._days = {d for d in self._days if d >= cutoff}
        return dropped
