"""What every benchmark prints with its figures: the machine it ran on."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (else the platform's word for it)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU model, cores, kernel, Python."""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def print_machine() -> None:
    """Print the machine line (call once at the start of a benchmark's output)."""
    print(describe(), flush=True)
