"""A test run killed mid-way leaves no broker behind (tests/support/children.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_a_broker_dies_with_the_test_process_that_started_it(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.support.mosquitto import Mosquitto\n"
        f"b = Mosquitto(Path({str(tmp_path)!r}) / 'mq').start()\n"
        "print(b.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout is not None
        broker_pid = int(runner.stdout.readline())
        os.kill(broker_pid, 0)  # the broker runs
        runner.send_signal(signal.SIGKILL)  # as a timeout kills a test run: no fixture cleanup
        runner.wait(10)

        def gone() -> bool:
            try:
                os.kill(broker_pid, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{broker_pid}/stat") as fh:  # a zombie not yet reaped by init
                return fh.read().split(") ", 1)[1].startswith("Z")

        assert wait_until(gone, 10), "mosquitto outlived the test process that started it"
    finally:
        if runner.poll() is None:
            runner.kill()
