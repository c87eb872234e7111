"""store-agent's command line (contract section 1): run, status, doctor, drain, decode."""

from agent.cli.commands import app, main

__all__ = ["app", "main"]
