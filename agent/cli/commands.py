"""`store-agent`: the command line (contract section 1). Exit 0 ok, 1 runtime failure, 2 bad usage/config/input."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli.common import Cli
from agent.config import AgentConfig, ConfigError, check_start, config_path, load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="store-agent: connects a retail store's devices to the cloud.",
)
decode_app = typer.Typer(no_args_is_help=True, help="Decode raw device data; prints one JSON object.")
app.add_typer(decode_app, name="decode")
cli = Cli("store-agent", app)  # fail, config errors, --version and main: shared with store-agent-ingest
fail = cli.fail
main = cli.main

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="agent.toml (else $STORE_AGENT_CONFIG, else /etc/store-agent/agent.toml)"
    ),
]


def _config(path: str | None, *, starting: bool = False) -> AgentConfig:
    """The validated config; with `starting`, also the checks before anything starts (files, TLS)."""
    where = config_path(path)
    with cli.config_errors():
        cfg = load(where)
        if starting:
            try:
                check_start(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return cfg


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the agent in the foreground (under systemd: Type=notify with a watchdog)."""
    from agent import logsetup
    from agent.cli.doctor import collect_checks
    from agent.daemon import run as run_daemon

    cfg = _config(config, starting=True)
    logsetup.setup(cfg.log.level)
    try:
        with cli.config_errors():
            code = run_daemon(cfg, doctor=lambda: collect_checks(cfg))
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
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="give up after this many seconds")
    ] = 60.0,
) -> None:
    """Send everything buffered now, with a progress bar, and say what is left."""
    from agent.cli.drain import drain as run_drain

    cfg = _config(config, starting=True)
    left = run_drain(cfg, timeout)
    raise typer.Exit(0 if left == 0 else 1)


@decode_app.command("ble")
def decode_ble(
    hex_data: Annotated[str, typer.Argument(metavar="HEX", help="raw advertising data, hex")],
) -> None:
    """Decode BLE advertising data (AD structures) into beacon frames."""
    from agent.protocols.ble import BleParseError, decode_ble_hex

    with _decode_errors("ble", BleParseError):
        _print(decode_ble_hex(hex_data))


@decode_app.command("scan")
def decode_scan(
    hex_data: Annotated[str, typer.Argument(metavar="HEX", help="one raw scanner read, hex")],
) -> None:
    """Decode one raw barcode scanner read (AIM identifier, GS1 element string)."""
    from agent.protocols.scan import ScanParseError, decode_scan_hex

    with _decode_errors("scan", ScanParseError):
        _print(decode_scan_hex(hex_data))


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
    with _decode_errors("escpos", EscposError):
        _print(decode(data, encoding))


@contextmanager
def _decode_errors(kind: str, error: type[Exception]) -> Iterator[None]:
    """The decoder's `error` is bad input: `decode KIND: why` on stderr, exit 2."""
    try:
        yield
    except error as exc:
        fail(f"decode {kind}: {exc}")


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
