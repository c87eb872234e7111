"""Child processes of a test die with it: no mosquitto or agent outlives a killed test run.

A test run killed by a timeout (pytest-timeout, a mutation tester, CI) never reaches its fixtures'
`finally`, and the brokers and agents it started in their own sessions would run on for good.
`PR_SET_PDEATHSIG` has the kernel send SIGKILL to the child when the thread that started it ends,
so start long-lived children from the test's main thread (as every helper here does).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent goes."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def preexec(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A `preexec_fn` that sets `die_with_parent` and then runs `then` (e.g. a resource limit)."""

    def run() -> None:
        die_with_parent()
        if then is not None:
            then()

    return run


def spawn_logged(
    argv: list[str],
    log: Path,
    env: dict[str, str],
    then: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log`, no stdin, in its own session (a
    signal meant for the test run does not reach it), dying with the test (`preexec(then)`)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=preexec(then),
        )
