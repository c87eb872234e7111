"""Logging to stderr as one logfmt line per record, which journald keeps as it is."""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogfmtFormatter(logging.Formatter):
    """`level=info logger=agent.uplink msg="connected to broker 127.0.0.1:1883"`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            # one line: the exception's type and text, not a traceback
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        message = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'level={record.levelname.lower()} logger={record.name} msg="{message}"'


def setup(level: str = "info") -> None:
    """Send every log record to stderr, one logfmt line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    for noisy in ("uvicorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level at run time (`set_log_level`)."""
    logging.getLogger().setLevel(LEVELS[level])
