"""The ingest's flow: MQTT deliveries → batches → one PostgreSQL transaction → PUBACKs.

Threads, each owning one thing: paho's network thread (the MQTT socket), the batch thread
(parses deliveries into COPY lines while earlier batches are being committed) and `writers`
commit threads, each with its own PostgreSQL connection, so that one instance keeps as many
transactions in flight as the database has cores to spare (a commit is mostly waiting on the
server). Queues connect them; the one between batch and commit threads holds at most
`writers + 1` batches, which bounds memory and lets the broker's Receive Maximum push back.
Batches are numbered as they are made and acknowledged in that order whatever order they commit
in, because MQTT wants a client's PUBACKs in the order the PUBLISHes arrived.

Invariants:
- a delivery is acknowledged only after the transaction holding its rows and rejects committed;
- a batch that fails to commit is retried, with backoff, until it commits or the process stops;
  nothing is acked meanwhile, so a crash at any point means redelivery, which the id ledger
  turns into nothing new;
- a batch PostgreSQL refuses for its data (which the envelope checks should make impossible) is
  split into its messages, and a message that is still refused is kept whole as a reject with
  the database's reason, so no payload can block the stream.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType

import psycopg

from ingest.config import IngestConfig
from ingest.db import Writer
from ingest.envelope import Parsed, Reject, parse_message
from ingest.mqtt import Delivery, Session

log = logging.getLogger("ingest")

STATS_INTERVAL_S = 60.0
RETENTION_INTERVAL_S = 3600.0
BACKOFF_MAX_S = 30.0


@dataclass(slots=True)
class Batch:
    number: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    parsed: Parsed = field(default_factory=Parsed)


def stamp(t: float) -> str:
    """A receive time as RFC 3339 text for COPY."""
    return datetime.fromtimestamp(t, UTC).isoformat()


class Ingest:
    """Wires the session, the batch thread and the commit thread; `run` blocks until stopped."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.mqtt.topic_prefix
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        n = cfg.ingest.writers
        self.batches: queue.Queue[Batch | None] = queue.Queue(maxsize=n + 1)
        self.session = Session(cfg, self.deliveries)
        dsn = cfg.dsn()
        name = f"store-agent-ingest:{cfg.ingest.client_id}"  # in pg_stat_activity
        self.writers = [Writer(dsn, name) for _ in range(n)]
        self._failed: str | None = None
        self._acked = threading.Condition()
        self._next_ack = 0
        self._stop = threading.Event()
        self.landed = 0
        self.messages = 0
        self.rejected = 0
        self.events = 0

    def run(self) -> int:
        """Migrate, connect, ingest until SIGTERM/SIGINT; 0 on a clean stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for writer in self.writers:
            writer.open()  # fails fast (exit 1) when PostgreSQL cannot be reached at start
        if self._stop.is_set():
            for writer in self.writers:
                writer.close()
            return 0
        self.session.start()
        batcher = threading.Thread(target=self._guard(self._batch_loop), name="ingest-batch", daemon=True)
        batcher.start()
        committers = [
            threading.Thread(
                target=self._guard(self._commit_loop), args=(w,), name=f"ingest-commit-{i}", daemon=True
            )
            for i, w in enumerate(self.writers)
        ]
        for committer in committers:
            committer.start()
        last_stats = time.monotonic()
        last_retention = -RETENTION_INTERVAL_S
        while not self._stop.wait(1.0):
            if not all(c.is_alive() for c in committers):
                break
            if self.cfg.ingest.retention_days and time.monotonic() - last_retention >= RETENTION_INTERVAL_S:
                last_retention = time.monotonic()
                self._retention()
            if time.monotonic() - last_stats >= STATS_INTERVAL_S:
                last_stats = time.monotonic()
                log.info(
                    "messages=%d events=%d landed=%d rejects=%d",
                    self.messages,
                    self.events,
                    self.landed,
                    self.rejected,
                )
        self._stop.set()
        batcher.join()
        for committer in committers:
            committer.join()
        self.session.stop()
        for writer in self.writers:
            writer.close()
        log.info(
            "stopped: messages=%d events=%d landed=%d rejects=%d",
            self.messages,
            self.events,
            self.landed,
            self.rejected,
        )
        if self._failed:
            raise RuntimeError(self._failed)
        return 0

    def _guard(self, target: Callable[..., None]) -> Callable[..., None]:
        """A thread's body that, should it fail, stops the whole ingest (exit 1) instead of dying alone."""

        def body(*args: object) -> None:
            try:
                target(*args)
            except Exception as exc:
                log.error("%s failed", threading.current_thread().name, exc_info=exc)
                self._failed = f"{threading.current_thread().name}: {type(exc).__name__}: {exc}"
                self._stop.set()
                with self._acked:  # wake committers waiting for their turn to ack
                    self._next_ack = -1
                    self._acked.notify_all()
                for _ in self.writers:  # and those waiting for a batch
                    try:
                        self.batches.put_nowait(None)
                    except queue.Full:
                        pass

        return body

    def _retention(self) -> None:
        """Drop the day partitions past `retention_days` (on a connection of its own)."""
        keeper = Writer(self.writers[0].dsn, self.writers[0].name)
        try:
            keeper.open()
            dropped = keeper.drop_older_than(self.cfg.ingest.retention_days, datetime.now(UTC).date())
            if dropped:
                log.info("retention: dropped %s", ", ".join(dropped))
        except psycopg.Error as exc:
            log.warning("retention: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            keeper.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batch in hand, then stopping", signum)
        self._stop.set()

    def _batch_loop(self) -> None:
        limit = self.cfg.ingest.batch_events
        wait_s = self.cfg.ingest.batch_wait_ms / 1000
        number = 0
        try:
            while not self._stop.is_set():
                try:
                    first = self.deliveries.get(timeout=0.2)
                except queue.Empty:
                    continue
                batch = Batch(number)
                number += 1
                self._add(batch, first)
                deadline = time.monotonic() + wait_s
                while len(batch.parsed.rows) < limit:
                    left = deadline - time.monotonic()
                    try:
                        delivery = (
                            self.deliveries.get(timeout=left) if left > 0 else self.deliveries.get_nowait()
                        )
                    except queue.Empty:
                        break
                    self._add(batch, delivery)
                self._put(batch)
        finally:
            for _ in self.writers:
                self._put(None)

    def _put(self, item: Batch | None) -> None:
        """Hand a batch (or the end) to the commit threads, unless the ingest has failed."""
        while self._failed is None:
            try:
                self.batches.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _add(self, batch: Batch, delivery: Delivery) -> None:
        batch.deliveries.append(delivery)
        parse_message(
            delivery.topic, delivery.payload, self.prefix, stamp(delivery.received_at), batch.parsed
        )

    def _commit_loop(self, writer: Writer) -> None:
        while True:
            batch = self.batches.get()
            if batch is None:
                return
            committed = self._commit(writer, batch)
            with self._acked:  # acknowledge in the order the batches were made
                while self._next_ack != batch.number:
                    if self._next_ack < 0:  # the ingest failed: nothing more is acknowledged
                        return
                    self._acked.wait()
                if committed:
                    self.session.ack(batch.deliveries)
                self._next_ack += 1
                self._acked.notify_all()

    def _commit(self, writer: Writer, batch: Batch) -> bool:
        """Commit a batch, retrying until it commits (True) or the ingest stops (False)."""
        delay = 0.5
        while True:
            try:
                landed = self._write(writer, batch.parsed)
                break
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                log.error(
                    "PostgreSQL refused a batch of %d messages: %s; landing them one by one",
                    len(batch.deliveries),
                    str(exc).splitlines()[0],
                )
                landed = self._write_one_by_one(writer, batch)
                break
            except psycopg.Error as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                writer.close()
                if self._stop.is_set():  # stopping: leave it unacked; the broker sends it again
                    log.warning("PostgreSQL: %s; stopping without this batch", first)
                    return False
                log.warning("PostgreSQL: %s; retrying in %.1f s", first, delay)
                self._stop.wait(delay)  # a stop does not wait out the backoff
                delay = min(delay * 2, BACKOFF_MAX_S)
        with self._acked:
            self.messages += len(batch.deliveries)
            self.events += len(batch.parsed.rows)
            self.landed += landed
            self.rejected += len(batch.parsed.rejects)
        return True

    def _write(self, writer: Writer, parsed: Parsed) -> int:
        return writer.write(parsed.rows, parsed.days, parsed.rejects)

    def _write_one_by_one(self, writer: Writer, batch: Batch) -> int:
        landed = 0
        for delivery in batch.deliveries:
            one = Parsed()
            at = stamp(delivery.received_at)
            parse_message(delivery.topic, delivery.payload, self.prefix, at, one)
            try:
                landed += self._write(writer, one)
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                reason = f"database refused it: {str(exc).splitlines()[0]}"
                self._write(writer, Parsed(rejects=[Reject(delivery.topic, delivery.payload, reason, at)]))
        return landed
