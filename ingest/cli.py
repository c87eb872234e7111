"""`store-agent-ingest`: the fleet side's command line (contract section 10).

Exit 0 ok, 1 runtime failure (PostgreSQL unreachable at start, say), 2 bad usage or bad config;
every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from agent.cli.common import Cli
from ingest.config import IngestConfig, config_path, load

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


cli = Cli("store-agent-ingest", app)  # the agent's fail, config errors, --version and main
fail = cli.fail
main = cli.main


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the ingest in the foreground until SIGTERM."""
    import psycopg

    from agent import logsetup
    from ingest.service import Ingest

    with cli.config_errors():
        cfg: IngestConfig = load(config_path(config))
        service = Ingest(cfg)
    logsetup.setup(cfg.log.level)
    try:
        code = service.run()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logging.getLogger("ingest").error("cannot use PostgreSQL: %s", first)
        fail(f"cannot use PostgreSQL: {first}", 1)
    raise typer.Exit(code)
