"""`drain`: send everything buffered, through the running agent or, when none runs, by itself."""

from __future__ import annotations

import time

from agent.cli.status import api_call, offline_status, read_status
from agent.config import AgentConfig
from agent.runlock import RunLock


def drain(cfg: AgentConfig, timeout: float) -> int:
    """Send everything buffered, with a progress bar; returns how many events are left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, markup=False, emoji=False, highlight=False)  # "[mqtt]" prints as written
    if cfg.mqtt.host is None:
        left = offline_status(cfg)["buffer"]["events"]
        console.print(f"no [mqtt] host configured: nothing can be sent; {left} events are left")
        return int(left)
    live = api_call(cfg, "POST", "/v1/drain") is not None
    lock = RunLock(cfg.agent.data_dir)
    uplink = outbox = None
    if not live and not lock.held_by_other():
        from agent.buffer import Outbox
        from agent.uplink import Uplink

        if not lock.acquire():
            live = True
        else:
            outbox = Outbox.from_config(cfg).start()
            uplink = Uplink(cfg, outbox).start()

    def left_now() -> tuple[int, int]:
        """Events still buffered, and how many of them are set aside (they wait for a later retry)."""
        if outbox is not None and uplink is not None:
            return outbox.count, uplink.status.set_aside_events
        state = read_status(cfg)
        aside = state.get("connection", {}).get("set_aside", {}).get("events", 0)
        return int(state["buffer"]["events"]), int(aside)

    start_left, aside = left_now()
    deadline = time.monotonic() + timeout
    columns = (
        TextColumn("draining"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9} ev/s"),
        TimeRemainingColumn(),
    )
    t0 = time.monotonic()
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("drain", total=max(start_left, 1), rate="-")
            left = start_left
            while left > aside and time.monotonic() < deadline:
                time.sleep(0.2)
                left, aside = left_now()
                sent = max(0, start_left - left)
                rate = sent / max(1e-6, time.monotonic() - t0)
                progress.update(task, completed=sent, rate=f"{rate:,.0f}")
            progress.update(task, completed=max(0, start_left - left))
    finally:
        if uplink is not None and outbox is not None:
            uplink.stop(2.0)
            outbox.close()
            lock.release()
    if left and left <= aside:
        console.print(
            f"{left} events are left in the buffer, set aside: the broker refused them or they cannot "
            "fit its packets; they are kept and retried (see `status`)"
        )
    elif left:
        console.print(f"{left} events are left in the buffer (timeout after {timeout:g} s)")
    else:
        console.print(f"buffer empty: {start_left} events sent")
    return left
