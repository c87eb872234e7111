"""The real `store-agent-ingest run` as a subprocess, and reading what it landed, for the ingest tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from tests.support.children import spawn_logged
from tests.support.wait import wait_until

STORE_AGENT_INGEST = str(Path(sys.executable).with_name("store-agent-ingest"))


def write_ingest_config(
    path: Path, broker_port: int, dsn: str, client_id: str, extra: str = "", batch_wait_ms: int = 20
) -> Path:
    """A minimal ingest.toml: loopback broker without TLS, short batches so tests see commits quickly."""
    path.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ntls = false\ntopic_prefix = "retail"\n'
        f'[ingest]\ndsn = "{dsn}"\ngroup = "ingest"\nclient_id = "{client_id}"\nbatch_wait_ms = {batch_wait_ms}\n{extra}\n'
    )
    return path


class IngestProcess:
    """One ingest instance; its stderr goes to a file the test can read.

    Every instance started is remembered until `kill_all`, which the ingest tests call at
    teardown, so a failing test leaves no process behind.
    """

    started: ClassVar[list[IngestProcess]] = []

    def __init__(self, workdir: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = workdir / f"{config.stem}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> IngestProcess:
        self.proc = spawn_logged(
            [STORE_AGENT_INGEST, "run", "--config", str(self.config)], self.log, self.env
        )
        IngestProcess.started.append(self)
        return self

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def subscriptions(self) -> int:
        """How many times it has (re)subscribed so far."""
        return self.tail(10**7).count('msg="subscribed to ')

    def wait_subscribed(self, times: int = 1, timeout: float = 20) -> None:
        assert wait_until(lambda: self.subscriptions() >= times, timeout), self.tail()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


def kill_all() -> None:
    """SIGKILL every instance still running (test teardown)."""
    for proc in IngestProcess.started:
        proc.kill9()
    IngestProcess.started.clear()


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement in its own connection; its rows ([] for a statement that returns none)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def landed_count(dsn: str) -> int:
    """Rows in store_events (0 until the schema exists)."""
    try:
        return int(query(dsn, "SELECT count(*) FROM store_events")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0
