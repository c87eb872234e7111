"""The agent as a bench's child process: its CPU time, and stopping it.

Named `child`, not `agent`: a bench runs as `python bench/X.py`, which puts bench/ on sys.path, where
a bench/agent.py could shadow the `agent` package.
"""

from __future__ import annotations

import os
import subprocess

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of one process (not its children), from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds (a bench never hangs on it)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
