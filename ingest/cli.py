"""`store-agent-ingest`: the fleet side's command line (contract section 10).

Exit 0 ok, 1 runtime failure (PostgreSQL unreachable at start, say), 2 bad usage or bad config;
every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from typer._click import exceptions as click_exceptions

from agent import __version__
from ingest.config import ConfigError, IngestConfig, config_path, load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="store-agent-ingest: lands every store agent's events in PostgreSQL.",
)

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="ingest.toml (else $STORE_AGENT_INGEST_CONFIG, else /etc/store-agent/ingest.toml)",
    ),
]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with `code`."""
    sys.stderr.write(f"store-agent-ingest: {message}\n")
    raise typer.Exit(code)


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the ingest in the foreground until SIGTERM."""
    import psycopg

    from agent import logsetup
    from ingest.service import Ingest

    try:
        cfg: IngestConfig = load(config_path(config))
        service = Ingest(cfg)
    except ConfigError as exc:
        fail(str(exc))
        return
    logsetup.setup(cfg.log.level)
    try:
        code = service.run()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logging.getLogger("ingest").error("cannot use PostgreSQL: %s", first)
        fail(f"cannot use PostgreSQL: {first}", 1)
        return
    raise typer.Exit(code)


def version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"store-agent-ingest {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """store-agent-ingest: lands every store agent's events in PostgreSQL."""


def main() -> None:
    """Console entry point: usage errors exit 2, anything unexpected exits 1 in one line."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.UsageError as exc:
        message = exc.format_message()
        if message:
            sys.stderr.write(f"store-agent-ingest: {message}\n")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last resort: one line, no traceback
        sys.stderr.write(f"store-agent-ingest: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
