"""`status`: ask the running agent over its loopback API, or read the buffer itself."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Any

from agent.config import AgentConfig, ConfigError, read_secret
from agent.runlock import RunLock


def api_call(cfg: AgentConfig, method: str, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    if not cfg.local_api.enabled:
        return None
    host = cfg.local_api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    request = urllib.request.Request(f"http://{host}:{cfg.local_api.port}{path}", method=method)
    try:
        if method != "GET":  # the server wants the API token on everything that changes state
            token = read_secret(cfg.local_api.token_file)
            if token:
                request.add_header("Authorization", f"Bearer {token.strip()}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError, ConfigError):
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
    from agent.buffer.reader import oldest_time, totals

    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            held = totals(conn)
            first = oldest_time(conn)
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as exc:
        state["last_error"] = f"cannot read {path}: {exc}"
        return state
    state["buffer"].update(
        events=held.events,
        bytes=held.bytes,
        oldest_unsent_s=round(max(0.0, time.time() - first), 3) if first is not None else 0.0,
    )
    return state


def read_status(cfg: AgentConfig) -> dict[str, Any]:
    """The running agent's status object, else what the buffer file says."""
    live = api_call(cfg, "GET", "/v1/status")
    if live is not None:
        live["running"] = True
        return live
    return offline_status(cfg)


def render_status(state: dict[str, Any]) -> None:
    """The status as a human table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, emoji=False, highlight=False)  # names and errors print as written
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
