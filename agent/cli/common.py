"""What every command line of the project does the same way (contract section 1, and section 10 for the ingest).

Exit 0 ok, 1 runtime failure, 2 bad usage, config or input; every failure is one line on stderr
that begins with the program's name, never a traceback; `--version` prints `NAME VERSION`.

Decisions:
- `store-agent` (agent/cli/commands.py) and `store-agent-ingest` (ingest/cli.py) both go through
  one `Cli`, so the exit codes and the one-line errors cannot drift apart between the two. The
  ingest may import this module; nothing here knows the ingest (the agent never imports it).
- The app runs with click's `standalone_mode=False` so that usage errors come back here as
  exceptions and are said in one line (exit 2), rather than click's multi-line usage block.
"""

# No `from __future__ import annotations`: typer reads the `--version` option from the annotation
# of a function defined inside `Cli`, which a string annotation could not name.
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from typer._click import exceptions as click_exceptions

from agent import __version__
from agent.config import ConfigError


class Cli:
    """One program's name in its messages, and the plumbing around its typer `app`."""

    def __init__(self, prog: str, app: typer.Typer) -> None:
        self.prog = prog
        self.app = app
        self._add_version_option()

    def fail(self, message: str, code: int = 2) -> NoReturn:
        """One line on stderr, then exit with `code`: never a traceback for bad input."""
        sys.stderr.write(f"{self.prog}: {message}\n")
        raise typer.Exit(code)

    @contextmanager
    def config_errors(self) -> Iterator[None]:
        """A ConfigError raised inside is its one line on stderr and exit 2."""
        try:
            yield
        except ConfigError as exc:
            self.fail(str(exc))

    def _add_version_option(self) -> None:
        prog = self.prog

        def version_callback(value: bool) -> None:
            if value:
                sys.stdout.write(f"{prog} {__version__}\n")
                raise typer.Exit(0)

        def main_options(
            version: Annotated[
                bool,
                typer.Option("--version", callback=version_callback, is_eager=True, help="print the version"),
            ] = False,
        ) -> None:
            pass  # the help text is the app's own (typer.Typer(help=...))

        self.app.callback()(main_options)

    def main(self) -> NoReturn:
        """Console entry point: click's usage errors exit 2, anything unexpected exits 1 in one line."""
        try:
            code = self.app(standalone_mode=False)
        except click_exceptions.UsageError as exc:
            message = exc.format_message()
            if message:  # empty when help was printed for a command given no arguments
                sys.stderr.write(f"{self.prog}: {message}\n")
            sys.exit(2)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # last resort: one line, no traceback
            sys.stderr.write(f"{self.prog}: {type(exc).__name__}: {exc}\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
