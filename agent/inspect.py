"""`status` and `drain`: ask the running agent over its loopback API, or read the buffer itself."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.core.envelope import id_time

LOCK_NAME = "agent.lock"


class RunLock:
    """An flock on `data_dir/agent.lock`, held by the running agent (one agent per data_dir)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def held_by_other(self) -> bool:
        """True when a running agent holds the lock."""
        if not self.path.exists():
            return False
        if self.acquire():
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _api(cfg: AgentConfig, method: str, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    if not cfg.local_api.enabled:
        return None
    host = cfg.local_api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    request = urllib.request.Request(f"http://{host}:{cfg.local_api.port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def offline_status(cfg: AgentConfig) -> dict[str, Any]:
    """What the buffer file says when no agent answers (read-only; never creates the file)."""
    path = cfg.buffer_path
    state: dict[str, Any] = {
        "running": RunLock(cfg.agent.data_dir).held_by_other(),
        "connection": {"configured": cfg.mqtt.host is not None, "connected": False},
        "buffer": {"path": str(path), "events": 0, "bytes": 0, "oldest_unsent_s": 0.0},
        "devices": [],
        "last_error": None,
    }
    if not path.exists():
        state["last_error"] = f"no buffer at {path} yet"
        return state
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            events, size = conn.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(length(body)), 0) FROM chunks"
            ).fetchone()
            row = conn.execute("SELECT body FROM chunks ORDER BY seq LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        state["last_error"] = f"cannot read {path}: {exc}"
        return state
    state["buffer"].update(
        events=events, bytes=size, oldest_unsent_s=round(max(0.0, time.time() - id_time(row[0])), 3) if row else 0.0
    )
    return state


def read_status(cfg: AgentConfig) -> dict[str, Any]:
    """The running agent's status object, else what the buffer file says."""
    live = _api(cfg, "GET", "/v1/status")
    if live is not None:
        live["running"] = True
        return live
    return offline_status(cfg)


def render_status(state: dict[str, Any]) -> None:
    """The status as a human table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    conn = state.get("connection", {})
    buf = state.get("buffer", {})
    table = Table(title="store-agent", show_header=False)
    table.add_row("agent", "running" if state.get("running") else "not running")
    if not conn.get("configured"):
        link = "no broker configured (buffering only)"
    else:
        link = "connected" if conn.get("connected") else "disconnected"
        if conn.get("reconnects"):
            link += f" ({conn['reconnects']} reconnects)"
    table.add_row("broker", link)
    table.add_row("buffer", f"{buf.get('events', 0)} events, {buf.get('bytes', 0)} bytes")
    table.add_row("oldest unsent", f"{buf.get('oldest_unsent_s', 0)} s")
    for device in state.get("devices", []):
        health = "up" if device.get("up") else "DOWN"
        if device.get("error"):
            health += f": {device['error']}"
        table.add_row(f"{device['kind']}:{device['name']}", health)
    table.add_row("last error", str(state.get("last_error") or "-"))
    console.print(table)


def drain(cfg: AgentConfig, timeout: float) -> int:
    """Send everything buffered, with a progress bar; returns how many events are left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if cfg.mqtt.host is None:
        left = offline_status(cfg)["buffer"]["events"]
        console.print(f"no [mqtt] host configured: nothing can be sent; {left} events are left")
        return int(left)
    live = _api(cfg, "POST", "/v1/drain") is not None
    lock = RunLock(cfg.agent.data_dir)
    uplink = outbox = None
    if not live and not lock.held_by_other():
        from agent.outbox import Outbox
        from agent.uplink import Uplink

        if not lock.acquire():
            live = True
        else:
            outbox = Outbox(cfg.buffer_path, tenant=cfg.agent.tenant, store=cfg.agent.store, agent=cfg.agent.id,
                            max_bytes=cfg.buffer.max_bytes, chunk_events=cfg.mqtt.batch_size).open().start()
            uplink = Uplink(cfg, outbox).start()

    def left_now() -> int:
        if outbox is not None:
            return outbox.count
        state = read_status(cfg)
        return int(state["buffer"]["events"])

    start_left = left_now()
    deadline = time.monotonic() + timeout
    columns = (TextColumn("draining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]:>9} ev/s"),
               TimeRemainingColumn())
    t0 = time.monotonic()
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("drain", total=max(start_left, 1), rate="-")
            left = start_left
            while left > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                left = left_now()
                sent = max(0, start_left - left)
                rate = sent / max(1e-6, time.monotonic() - t0)
                progress.update(task, completed=sent, rate=f"{rate:,.0f}")
            progress.update(task, completed=max(0, start_left - left))
    finally:
        if uplink is not None and outbox is not None:
            uplink.stop(2.0)
            outbox.close()
            lock.release()
    if left:
        console.print(f"{left} events are left in the buffer (timeout after {timeout:g} s)")
    else:
        console.print(f"buffer empty: {start_left} events sent")
    return left
