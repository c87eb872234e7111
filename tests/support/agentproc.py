"""The real agent as a subprocess (`store-agent run --config FILE`), for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.buffer import Outbox
from agent.core.envelope import Event

STORE_AGENT = str(Path(sys.executable).with_name("store-agent"))


def write_config(path: Path, data_dir: Path, broker_port: int | None, extra: str = "", *,
                 mqtt_extra: str = "", api_port: int | None = None, tenant: str = "acme", store: str = "s1", agent: str = "a1") -> Path:
    """A minimal agent.toml for tests: loopback broker without TLS (or none), API off unless a port is given.

    `mqtt_extra` goes into [mqtt]; `extra` follows the sections (e.g. `[[pos]]` tables).
    """
    mqtt = (f'host = "127.0.0.1"\nport = {broker_port}\ntls = false\n' if broker_port else "")
    api = (f'listen = "127.0.0.1:{api_port}"\n' if api_port else "enabled = false\n")
    path.write_text(
        f'[agent]\ntenant = "{tenant}"\nstore = "{store}"\nid = "{agent}"\ndata_dir = "{data_dir}"\n'
        f"[mqtt]\n{mqtt}backoff_max_s = 1.0\n{mqtt_extra}\n"
        f"[local_api]\n{api}"
        f"{extra}\n"
    )
    return path


class AgentProcess:
    """Starts, kills (-9) and stops one agent; its stderr goes to a log file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [STORE_AGENT, "run", "--config", str(self.config)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown, no flush."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 20.0) -> bool:
        """Wait until the agent's log contains `needle` (False on timeout or if it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            if not self.alive():
                return needle in self.log_text()
            time.sleep(0.02)
        return False


def prefill(data_dir: Path, events: list[Event], *, batch: int = 500, chunk_events: int = 500) -> list[str]:
    """Commit `events` into the agent's own buffer file (acme/s1/a1) before it starts; their ids."""
    ids: list[str] = []
    with Outbox(data_dir / "buffer.db", tenant="acme", store="s1", agent="a1", chunk_events=chunk_events) as outbox:
        for start in range(0, len(events), batch):
            ids += outbox.commit_sync(events[start : start + batch]).ids
    return ids


def status_json(config: Path) -> dict[str, Any]:
    """`store-agent status --json` of a config."""
    out = subprocess.run([STORE_AGENT, "status", "--json", "--config", str(config)],
                         capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
