"""The real agent as a subprocess (`store-agent run --config FILE`), for integration tests.

`STORE_AGENT` is the one place tests find the executable: the console script beside the running
interpreter, so each worktree's tests run that worktree's agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.buffer import prefill
from tests.support.children import spawn_logged
from tests.support.wait import wait_until

STORE_AGENT = str(Path(sys.executable).with_name("store-agent"))

__all__ = ["STORE_AGENT", "AgentProcess", "prefill", "status_json", "wait_until", "write_config"]


def write_config(
    path: Path,
    data_dir: Path,
    broker_port: int | None,
    extra: str = "",
    *,
    mqtt_extra: str = "",
    api_port: int | None = None,
    tenant: str = "acme",
    store: str = "s1",
    agent: str = "a1",
) -> Path:
    """A minimal agent.toml for tests: loopback broker without TLS (or none), API off unless a port is given.

    `mqtt_extra` goes into [mqtt]; `extra` follows the sections (e.g. `[[pos]]` tables; `toml_table`
    writes one).
    """
    mqtt = f'host = "127.0.0.1"\nport = {broker_port}\ntls = false\n' if broker_port else ""
    api = f'listen = "127.0.0.1:{api_port}"\n' if api_port else "enabled = false\n"
    path.write_text(
        f'[agent]\ntenant = "{tenant}"\nstore = "{store}"\nid = "{agent}"\ndata_dir = "{data_dir}"\n'
        f"[mqtt]\n{mqtt}backoff_max_s = 1.0\n{mqtt_extra}\n"
        f"[local_api]\n{api}"
        f"{extra}\n"
    )
    return path


def toml_keys(keys: dict[str, Any]) -> str:
    """`key = value` lines (values as JSON, which TOML reads the same for strings, numbers, booleans)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def toml_table(name: str, keys: dict[str, Any]) -> str:
    """A `[name]` table (or `[[name]]` when `name` is written so) with `keys`."""
    header = name if name.startswith("[") else f"[{name}]"
    return f"\n{header}\n{toml_keys(keys)}"


class AgentProcess:
    """Starts, kills (-9) and stops one agent; its stdout and stderr go to a log file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. to set an rlimit)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> AgentProcess:
        self.proc = spawn_logged(
            [STORE_AGENT, "run", "--config", str(self.config)], self.log, self.env, self.preexec_fn
        )
        self.starts += 1
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

    def kill9(self) -> None:
        """kill -9 an agent that must be running: one that died by itself fails the test."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the agent died by itself ({self.proc.returncode}): {self.tail()}")
        self.kill()

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

    def tail(self, chars: int = 3000) -> str:
        """The end of the agent's log, for assertion messages."""
        return self.log_text()[-chars:]

    def wait_log(self, needle: str, timeout: float = 20.0) -> bool:
        """Wait until the agent's log contains `needle` (False on timeout or if it died)."""
        wait_until(lambda: needle in self.log_text() or not self.alive(), timeout)
        return needle in self.log_text()

    def wait_http(self, url: str, timeout: float = 20.0) -> bool:
        """Wait until `url` (e.g. the local API's /healthz) answers 200; False on timeout or death."""
        import httpx  # a test dependency; only tests that run the API need it

        def answers() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(lambda: not self.alive() or answers(), timeout, interval=0.05)
        return self.alive() and answers()


def status_json(config: Path) -> dict[str, Any]:
    """`store-agent status --json` of a config."""
    out = subprocess.run(
        [STORE_AGENT, "status", "--json", "--config", str(config)],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)
