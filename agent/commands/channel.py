"""The command channel's wiring: from the uplink's thread to one worker, the record, the reply.

Threads: the uplink's session thread only queues what arrives (`submit`), so its select loop never
waits on SQLite. One worker thread ("commands") takes commands in arrival order: it reads the
payload, answers a repeated id from its stored row, runs the check order (`rules.check`),
executes, and commits the record (id, outcome, reply bytes) with its `command.executed` /
`command.refused` event in one writer transaction (`Outbox.call`), then hands the stored reply to
the uplink, which publishes it on the live session ahead of the event backlog. Blocking work
(`drain`'s wait, `diagnostics`' doctor checks) runs here, off the event loop and the uplink.

Idempotency across kill -9 (decision): `erase_subject`, the one command with a durable effect,
erases inside the same transaction that records it: either both are on disk or neither, so a
retry after a crash erases once. The others (`status`, `drain`, `set_log_level`, `diagnostics`)
change nothing that survives the process; the record is committed after they ran and before the
reply, so a crash in between leaves no effect behind and no record: the cloud's retry (same id)
runs it once in the new process. A recorded id is never run again; its reply is sent as stored.

Replies are published from the stored row, never rebuilt. The broker's PUBACK of a reply marks
its row `acked`; at each connect the rows not acked are published again (at least once: the
cloud matches replies by id). A commit that fails (buffer full or failing) records nothing: the
reply is `failed`, sent unrecorded, and the cloud may retry.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.buffer import Outbox
from agent.buffer.footprint import truncate_wal
from agent.buffer.writer import CallResult
from agent.commands import rules, store
from agent.commands.erase import candidates, erase
from agent.commands.signature import Keys
from agent.config import AgentConfig
from agent.core.envelope import Event
from agent.logsetup import RING, set_level
from agent.status import StatusReporter
from agent.uplink import Reply, Uplink

log = logging.getLogger(__name__)

# Commands waiting for the worker at most; a flood beyond it is dropped with a log line.
MAX_QUEUED = 1000
# How long `drain` waits for the backlog to go before it replies with what is left.
DRAIN_WAIT_S = 20.0
RECORD_TIMEOUT_S = 30.0
# The largest reply (diagnostics with 5,000 log lines stays well under it).
MAX_REPLY_BYTES = 4 << 20

DoctorCheck = tuple[str, str, str]  # (PASS|WARN|FAIL, what, detail), as agent/cli/doctor.py makes them


class CommandChannel:
    """Receives commands from the uplink, runs them on one worker thread, replies through the uplink."""

    def __init__(
        self,
        cfg: AgentConfig,
        outbox: Outbox,
        uplink: Uplink,
        reporter: StatusReporter,
        doctor: Callable[[], list[DoctorCheck]] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.uplink = uplink
        self.reporter = reporter
        self.doctor = doctor
        self._clock = clock
        c = cfg.commands
        self.policy = rules.Policy(
            None if c.allow is None else frozenset(c.allow), frozenset(c.require_signature)
        )
        self.keys = Keys(c.public_keys)
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        uplink.commands = self

    # ---- from the uplink's thread: queue and return ---------------------------------------------

    def submit(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None:
        if self._queue.qsize() >= MAX_QUEUED:
            log.warning("command on %s dropped: %d commands already wait", topic[:200], MAX_QUEUED)
            return
        self._queue.put(("cmd", topic, payload, response_topic, correlation, time.perf_counter()))

    def connected(self) -> None:
        self._queue.put(("resend",))

    def reply_acked(self, command_id: str) -> None:
        self._queue.put(("acked", command_id))

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> CommandChannel:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """True while the worker thread runs (it outlives any command: see `_run`)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "cmd":
                    self.handle(*item[1:5])
                elif kind == "acked":
                    acked = [item[1]]
                    while len(acked) < 512:  # PUBACKs come in bursts: one transaction for them
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None or nxt[0] != "acked":
                            self._queue.put(nxt)  # not ours to batch: handled in turn (order barely matters)
                            break
                        acked.append(nxt[1])
                    self._mark_acked(acked)
                elif kind == "resend":
                    for row in store.unacked(self.outbox.read_conn()):
                        self.uplink.send_reply(Reply(row.id, row.reply, row.resp_topic, row.corr))
            except Exception as exc:  # the worker outlives any command
                log.error("command channel: %s failed: %s", item[0], exc, exc_info=exc)

    def _mark_acked(self, ids: list[str]) -> None:
        self.outbox.call(lambda conn: store.mark_acked(conn, ids), timeout=RECORD_TIMEOUT_S)

    # ---- one command ---------------------------------------------------------------------------------

    def handle(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None:
        """Check, execute, record, reply (in the worker thread; also called directly by tests)."""
        name = topic.rsplit("/", 1)[-1]
        incoming = rules.read(payload)
        if incoming.id is None:
            log.warning(
                "command %s on %s has no readable id, so no reply: %s",
                name[:64],
                topic[:200],
                incoming.problem or "no id",
            )
            self._count(name, "unreadable")
            return
        cid = incoming.id
        stored = store.lookup(self.outbox.read_conn(), cid)
        if stored is not None:
            log.info(
                "command %s (%s) seen before: its stored reply is sent again, nothing runs",
                cid[:64],
                name[:64],
            )
            self._send(stored)
            return
        now = datetime.fromtimestamp(self._clock(), UTC)
        checked = rules.check(name, incoming, self.policy, self.keys.verify, now)
        if isinstance(checked, rules.Refusal):
            log.warning("command %s (%s) refused: %s: %s", cid[:64], name[:64], checked.code, checked.message)
            reply = rules.reply_error(cid, checked.code, checked.message)
            self._record(
                store.Stored(cid, name[:128], False, checked.code, reply, response_topic, correlation)
            )
            return
        if isinstance(checked, rules.EraseSubjectArgs):
            self._erase(cid, name, checked, response_topic, correlation)
            return
        try:
            result = self._execute(name, checked)
            reply = rules.reply_ok(cid, result)
            limit = self._reply_limit(response_topic)
            if len(reply) > limit:  # a reply the broker would drop the session for: never sent
                raise ValueError(f"the result takes {len(reply)} bytes, over the {limit} a reply may take")
            rec = store.Stored(cid, name, True, None, reply, response_topic, correlation)
        except Exception as exc:
            log.error("command %s (%s) failed: %s", cid[:64], name, exc)
            reply = rules.reply_error(cid, "failed", f"{type(exc).__name__}: {exc}"[:500])
            rec = store.Stored(cid, name, False, "failed", reply, response_topic, correlation)
        log.info("command %s (%s) done: %s", cid[:64], name, "ok" if rec.ok else rec.code)
        self._record(rec)

    def _execute(self, name: str, args: rules.Args) -> dict[str, Any]:
        if isinstance(args, rules.SetLogLevelArgs):
            set_level(args.level)
            return {"level": args.level}
        if isinstance(args, rules.DiagnosticsArgs):
            checks = self.doctor() if self.doctor is not None else []
            doctor = [
                {"check": what, "ok": level != "FAIL", "detail": f"{level}: {detail}"}
                for level, what, detail in checks
            ]
            lines = RING.tail(args.log_lines)
            # the oldest lines give way when the reply would not fit the broker's packets
            room = self._reply_limit(None) - len(
                rules.reply_ok("x" * rules.MAX_ID, {"doctor": doctor, "log": []})
            )
            while lines and sum(len(line) + 8 for line in lines) > room:  # 8: quotes, comma, escapes' slack
                lines = lines[len(lines) // 10 + 1 :]
            return {"doctor": doctor, "log": lines}
        if name == "status":
            return self.reporter.status()
        if name == "drain":
            return self._drain()
        raise NotImplementedError(name)  # rules.ARGS and this method disagree: a bug

    def _reply_limit(self, response_topic: str | None) -> int:
        """The largest reply payload that fits one PUBLISH to the broker (its packet limit, if it gave one)."""
        packet = self.uplink.status.max_packet_bytes
        if packet is None:
            return MAX_REPLY_BYTES
        topic = max(len(self.uplink.reply_topic.encode()), len((response_topic or "").encode()))
        return min(MAX_REPLY_BYTES, packet - topic - 64)  # 64: fixed header, ids, properties

    def _drain(self) -> dict[str, int]:
        before = sum(self.outbox.events_sent.values())
        self.uplink.attempt_now()
        deadline = time.monotonic() + DRAIN_WAIT_S
        while self.outbox.count > self.uplink.status.set_aside_events and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"sent": sum(self.outbox.events_sent.values()) - before, "left": self.outbox.count}

    def _erase(
        self,
        cid: str,
        name: str,
        args: rules.EraseSubjectArgs,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        now = self._clock()
        seqs, after = candidates(self.outbox.read_conn(), args.member_id, args.token)  # off the writer

        def erase_and_record(conn: sqlite3.Connection) -> Any:
            done = erase(conn, args.member_id, args.token, seqs, after)
            rec = store.Stored(
                cid,
                name,
                True,
                None,
                rules.reply_ok(cid, {"erased": done.value}),
                response_topic,
                correlation,
            )
            old = store.insert(conn, rec, now)
            if old is not None:  # recorded meanwhile: undo the erasure's accounting, run nothing
                raise _AlreadyRecorded(old)
            return CallResult(
                value=(rec, done.value),
                events=[self._event(rec)],
                removed_events=done.removed_events,
                removed_bytes=done.removed_bytes,
                removed_low_bytes=done.removed_low_bytes,
            )

        try:
            rec, erased = self.outbox.call(erase_and_record, timeout=RECORD_TIMEOUT_S)
        except _AlreadyRecorded as exc:
            self._send(exc.stored)
            return
        except Exception as exc:
            self._unrecorded(cid, name, exc, response_topic, correlation)
            return
        self._truncate_wal()
        log.info("command %s (erase_subject) done: %d buffered events erased", cid[:64], erased)
        self._count(name, "ok")
        self._send(rec)

    def _truncate_wal(self) -> None:
        """After an erasure: the WAL's copies of the old pages are given back (contract section 8)."""
        for _ in range(20):
            conn = sqlite3.connect(self.outbox.path, isolation_level=None, timeout=5)
            try:
                if truncate_wal(conn):
                    return
            finally:
                conn.close()
            time.sleep(0.05)
        log.warning(
            "erase_subject: the WAL could not be truncated now (readers held it); the next truncation will"
        )

    def _event(self, rec: store.Stored) -> Event:
        kind = "command.refused" if rec.code is not None and rec.code != "failed" else "command.executed"
        return Event(kind, rules.event_data(rec.id, rec.name, rec.ok, rec.code), "agent")

    def _record(self, rec: store.Stored) -> None:
        now = self._clock()

        def record(conn: sqlite3.Connection) -> Any:
            old = store.insert(conn, rec, now)
            if old is not None:
                raise _AlreadyRecorded(old)
            return CallResult(value=rec, events=[self._event(rec)])

        try:
            self.outbox.call(record, timeout=RECORD_TIMEOUT_S)
        except _AlreadyRecorded as exc:
            self._send(exc.stored)
            return
        except Exception as exc:
            self._unrecorded(rec.id, rec.name, exc, rec.resp_topic, rec.corr)
            return
        self._count(rec.name, "ok" if rec.ok else str(rec.code))
        self._send(rec)

    def _unrecorded(
        self, cid: str, name: str, exc: BaseException, response_topic: str | None, correlation: bytes | None
    ) -> None:
        """The record could not be committed: nothing ran durably; say so, unrecorded (a retry runs it)."""
        log.error("command %s (%s) not recorded, so not done: %s", cid[:64], name[:64], exc)
        self._count(name, "failed")
        reply = rules.reply_error(cid, "failed", f"the agent could not record the command: {exc}"[:500])
        self.uplink.send_reply(Reply(cid, reply, response_topic, correlation))

    def _send(self, rec: store.Stored) -> None:
        self.uplink.send_reply(Reply(rec.id, rec.reply, rec.resp_topic, rec.corr))

    def _count(self, name: str, outcome: str) -> None:
        label = name if name in rules.ARGS else "unknown"  # a topic level is anyone's: bound the labels
        key = (label, outcome)
        self.reporter.commands[key] = self.reporter.commands.get(key, 0) + 1


class _AlreadyRecorded(Exception):
    def __init__(self, stored: store.Stored) -> None:
        super().__init__(stored.id)
        self.stored = stored
