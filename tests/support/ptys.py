"""Real pseudo-terminals for serial-device tests: the test holds the master, the driver opens the slave."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import tty


class Pty:
    """A pty pair in raw mode (no echo, no CR/LF mangling), master non-blocking.

    The test keeps the slave open too, as the registry does for `sim:` ports, so the pty survives
    the driver closing and reopening `path` (and an agent restarting).
    """

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def unread(self) -> int:
        """Bytes written to the master that the device side has not read yet."""
        return struct.unpack("i", fcntl.ioctl(self.slave, termios.TIOCINQ, b"\0\0\0\0"))[0]

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
