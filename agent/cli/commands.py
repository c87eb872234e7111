"""`store-agent`: the command line (contract section 1). Exit 0 ok, 1 runtime failure, 2 bad usage/config/input."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exceptions

from agent import __version__
from agent.config import AgentConfig, ConfigError, check_start, config_path, load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="store-agent: connects a retail store's devices to the cloud.",
)
decode_app = typer.Typer(no_args_is_help=True, help="Decode raw device data; prints one JSON object.")
app.add_typer(decode_app, name="decode")

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="agent.toml (else $STORE_AGENT_CONFIG, else /etc/store-agent/agent.toml)"),
]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with `code`: never a traceback for bad input."""
    sys.stderr.write(f"store-agent: {message}\n")
    raise typer.Exit(code)


def _config(path: str | None, *, starting: bool = False) -> AgentConfig:
    """The validated config; with `starting`, also the checks before anything starts (files, TLS)."""
    where = config_path(path)
    try:
        cfg = load(where)
        if starting:
            try:
                check_start(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return cfg
    except ConfigError as exc:
        fail(str(exc))
        raise AssertionError from None  # unreachable: fail() exits


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the agent in the foreground (under systemd: Type=notify with a watchdog)."""
    from agent import logsetup
    from agent.cli.doctor import collect_checks
    from agent.daemon import run as run_daemon

    cfg = _config(config, starting=True)
    logsetup.setup(cfg.log.level)
    try:
        code = run_daemon(cfg, doctor=lambda: collect_checks(cfg))
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        logging.getLogger("agent").error("cannot run: %s", exc)
        fail(f"cannot run: {exc}", 1)
    raise typer.Exit(code)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the status object as JSON")] = False,
) -> None:
    """Connection state, buffer depth and oldest unsent age, per-device health, last error."""
    from agent.cli.status import read_status

    cfg = _config(config)
    state = read_status(cfg)
    if as_json:
        sys.stdout.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return
    from agent.cli.status import render_status

    render_status(state)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check config, serial ports and permissions, BLE adapter, broker and TLS, disk room, clock."""
    from agent.cli.doctor import run_checks

    cfg = _config(config)
    ok = run_checks(cfg)
    raise typer.Exit(0 if ok else 1)


@app.command()
def drain(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="give up after this many seconds")] = 60.0,
) -> None:
    """Send everything buffered now, with a progress bar, and say what is left."""
    from agent.cli.drain import drain as run_drain

    cfg = _config(config, starting=True)
    left = run_drain(cfg, timeout)
    raise typer.Exit(0 if left == 0 else 1)


@decode_app.command("ble")
def decode_ble(hex_data: Annotated[str, typer.Argument(metavar="HEX", help="raw advertising data, hex")]) -> None:
    """Decode BLE advertising data (AD structures) into beacon frames."""
    from agent.protocols.ble import BleParseError, decode_ble_hex

    try:
        _print(decode_ble_hex(hex_data))
    except BleParseError as exc:
        fail(f"decode ble: {exc}")


@decode_app.command("scan")
def decode_scan(hex_data: Annotated[str, typer.Argument(metavar="HEX", help="one raw scanner read, hex")]) -> None:
    """Decode one raw barcode scanner read (AIM identifier, GS1 element string)."""
    from agent.protocols.scan import ScanParseError, decode_scan_hex

    try:
        _print(decode_scan_hex(hex_data))
    except ScanParseError as exc:
        fail(f"decode scan: {exc}")


@decode_app.command("escpos")
def decode_escpos(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="an ESC/POS byte stream ('-' for stdin)")],
    encoding: Annotated[str, typer.Option("--encoding", help="text encoding of the printer")] = "gb18030",
) -> None:
    """Extract receipts (one per paper cut) from an ESC/POS byte stream."""
    from agent.protocols.escpos import EscposError
    from agent.protocols.escpos import decode_escpos as decode

    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        fail(f"decode escpos: {file}: {exc.strerror}")
    try:
        _print(decode(data, encoding))
    except EscposError as exc:
        fail(f"decode escpos: {exc}")


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"store-agent {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """store-agent: connects a retail store's devices to the cloud."""


def main() -> None:
    """Console entry point: click's usage errors exit 2, anything unexpected exits 1 in one line."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.UsageError as exc:
        message = exc.format_message()
        if message:  # empty when help was printed for a command given no arguments
            sys.stderr.write(f"store-agent: {message}\n")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last resort: one line, no traceback
        sys.stderr.write(f"store-agent: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
