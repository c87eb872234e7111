"""`store-agent doctor`: checks a technician runs on a store PC, each one line, PASS/WARN/FAIL.

Lines are printed as literal text: a device named `x` or a detail such as `[mqtt]` must
appear as written, so rich's markup and emoji codes are off; only the level is coloured.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import ssl
import stat
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig, ConfigError, config_files, read_secret, readable_file

Check = tuple[str, str, str]  # (PASS|WARN|FAIL, what, detail)


def check_data_dir(cfg: AgentConfig) -> list[Check]:
    data_dir = cfg.agent.data_dir
    out: list[Check] = []
    if data_dir.exists() and not data_dir.is_dir():
        return [("FAIL", "data_dir", f"{data_dir} is not a directory")]
    probe = data_dir if data_dir.exists() else data_dir.parent
    if not os.access(probe, os.W_OK):
        out.append(("FAIL", "data_dir", f"{data_dir} is not writable by uid {os.getuid()}"))
        return out
    usage = shutil.disk_usage(probe)
    need = cfg.buffer.max_bytes
    level = "PASS" if usage.free > need else "WARN"
    out.append(
        (
            level,
            "disk room",
            f"{usage.free // (1 << 20)} MiB free at {probe}; buffer cap {need // (1 << 20)} MiB",
        )
    )
    return out


def check_serial(path: str, what: str) -> Check:
    if path.startswith("sim:"):
        return ("PASS", what, f"{path} (simulated)")
    p = Path(path)
    if not p.exists():
        return ("FAIL", what, f"{path} does not exist (unplugged? udev name?)")
    mode = p.stat().st_mode
    if not stat.S_ISCHR(mode):
        return ("WARN", what, f"{path} is not a character device")
    if not os.access(p, os.R_OK | os.W_OK):
        try:
            group = grp.getgrgid(p.stat().st_gid).gr_name
        except KeyError:
            group = str(p.stat().st_gid)
        return ("FAIL", what, f"{path}: no read/write permission (add the agent's user to group {group})")
    return ("PASS", what, f"{path} readable and writable")


def check_ble(cfg: AgentConfig) -> list[Check]:
    if cfg.ble is None or not cfg.ble.enabled:
        return []
    if getattr(cfg.ble, "replay", None):
        return [("PASS", "ble", f"replaying {cfg.ble.replay}")]
    adapter = getattr(cfg.ble, "adapter", "hci0")
    if not Path(f"/sys/class/bluetooth/{adapter}").exists():
        return [("FAIL", "ble", f"adapter {adapter} not found (/sys/class/bluetooth/{adapter})")]
    if not Path("/run/dbus/system_bus_socket").exists():
        return [("FAIL", "ble", "no D-Bus system bus: BlueZ (bluetoothd) is not running")]
    return [("PASS", "ble", f"adapter {adapter} present")]


def check_broker(cfg: AgentConfig) -> list[Check]:
    m = cfg.mqtt
    if m.host is None:
        return [("WARN", "broker", "no [mqtt] host: the agent only buffers")]
    out: list[Check] = []
    if m.protocol == "3.1.1":
        out.append(
            (
                "WARN",
                "mqtt protocol",
                "3.1.1: a broker that denies a publish still acknowledges it and "
                'drops it, so refused events are lost unseen; use protocol = "5"',
            )
        )
    if not m.tls and not m.is_loopback:
        if m.insecure_plaintext:
            out.append(
                (
                    "WARN",
                    "broker TLS",
                    f"{m.host} is not on loopback and tls = false "
                    "(insecure_plaintext = true): the password and events travel in plaintext",
                )
            )
        else:
            out.append(("FAIL", "broker TLS", f"{m.host} is not on loopback and tls = false"))
    try:
        sock = socket.create_connection((m.host, m.port), timeout=5)
    except OSError as exc:
        out.append(("FAIL", "broker", f"{m.host}:{m.port} unreachable: {exc}"))
        return out
    with sock:
        if m.tls:
            try:
                context = ssl.create_default_context(cafile=m.ca_file)
                if m.cert_file and m.key_file:
                    context.load_cert_chain(m.cert_file, m.key_file)
                with context.wrap_socket(sock, server_hostname=m.host) as tls:
                    out.append(("PASS", "broker TLS", f"{m.host}:{m.port} {tls.version()}"))
            except (ssl.SSLError, OSError) as exc:
                out.append(("FAIL", "broker TLS", f"handshake with {m.host}:{m.port} failed: {exc}"))
                return out
        else:
            out.append(("PASS", "broker", f"{m.host}:{m.port} reachable"))
    if m.password_file:
        try:
            read_secret(m.password_file)
            out.append(("PASS", "mqtt password_file", "readable"))
        except ConfigError as exc:
            out.append(("FAIL", "mqtt password_file", str(exc)))
    return out


def check_files(cfg: AgentConfig) -> list[Check]:
    """Every file the config names, as `run` checks it before starting."""
    out: list[Check] = []
    for key, path in config_files(cfg):
        try:
            readable_file(key, path)
            out.append(("PASS", key, f"{path} readable"))
        except ConfigError as exc:
            out.append(("FAIL", key, str(exc).removeprefix(f"{key}: ")))
    return out


def check_clock() -> list[Check]:
    now = time.time()
    if now < 1_700_000_000:
        return [("FAIL", "clock", f"system time {time.ctime(now)} is in the past: timestamps would be wrong")]
    synced = Path("/run/systemd/timesync/synchronized").exists()
    return [
        (
            "PASS" if synced else "WARN",
            "clock",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            + ("" if synced else " (NTP sync not confirmed)"),
        )
    ]


def collect_checks(cfg: AgentConfig) -> list[Check]:
    """Every check's (level, what, detail): `doctor` prints them, `diagnostics` replies with them."""
    checks: list[Check] = [("PASS", "config", "valid")]
    checks += check_data_dir(cfg)
    checks += check_files(cfg)
    checks += [check_serial(p.port, f"pos:{p.name}") for p in cfg.pos]
    checks += [check_serial(p.forward_to, f"printer:{p.name}") for p in cfg.pos if p.forward_to]
    checks += [check_serial(s.port, f"scanner:{s.name}") for s in cfg.scanner]
    checks += check_ble(cfg)
    checks += check_broker(cfg)
    checks += check_clock()
    return checks


def run_checks(cfg: AgentConfig, echo: Callable[[str], None] | None = None) -> bool:
    """Print each check; True when none failed."""
    from rich.console import Console
    from rich.text import Text

    console = Console(soft_wrap=True)  # one line a check, however narrow the terminal
    checks = collect_checks(cfg)
    colors = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    for level, what, detail in checks:
        if echo is not None:
            echo(f"{level} {what}: {detail}")
        else:
            # Text is never parsed for markup or emoji codes: names and paths print as written
            console.print(Text.assemble((level, colors[level]), f" {what}: {detail}"))
    return not any(level == "FAIL" for level, _, _ in checks)
