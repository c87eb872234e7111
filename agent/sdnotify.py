"""systemd's notify protocol (sd_notify(3)): READY=1, WATCHDOG=1, STOPPING=1, STATUS=…."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when not started by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # an abstract socket is given with a leading '@'
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send one state string; False when there is no systemd to tell or the send failed."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(state.encode(), self._address)
            return True
        except OSError:
            return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, in seconds; None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
