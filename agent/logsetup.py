"""Logging to stderr as one logfmt line per record, which journald keeps as it is.

The same lines are kept in memory (`RING`, the last `RING_LINES`) for the `diagnostics` command,
so support sees a store's log without a shell on it. Every secret read from a file
(`config.read_secret`) is registered with `redact` and replaced by `***` in every line, stderr
and the ring alike: a secret that slipped into a message (an exception's text, a URL) still
never leaves the process.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


RING_LINES = 5000
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def redact(secret: str | None) -> None:
    """Never print `secret` (a password, a token) in a log line from now on."""
    if secret and len(secret) >= 4:  # shorter ones would blank out ordinary words
        with _secrets_lock:
            _secrets.add(secret)


def _scrub(line: str) -> str:
    for secret in tuple(_secrets):
        if secret in line:
            line = line.replace(secret, "***")
    return line


class RingHandler(logging.Handler):
    """Keeps the last `maxlen` formatted lines in memory (thread-safe: deque appends are atomic)."""

    def __init__(self, maxlen: int = RING_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not worth a crash
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        """The last `n` lines, oldest first."""
        lines = list(self.lines)
        return lines[-n:] if n > 0 else []


RING = RingHandler()


class LogfmtFormatter(logging.Formatter):
    """`level=info logger=agent.uplink msg="connected to broker 127.0.0.1:1883"`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            # one line: the exception's type and text, not a traceback
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        message = _scrub(message).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'level={record.levelname.lower()} logger={record.name} msg="{message}"'


def setup(level: str = "info") -> None:
    """Send every log record to stderr, one logfmt line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    RING.setFormatter(handler.formatter)
    root.handlers[:] = [handler, RING]
    root.setLevel(LEVELS.get(level, logging.INFO))
    for noisy in ("uvicorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level at run time (`set_log_level`)."""
    logging.getLogger().setLevel(LEVELS[level])
