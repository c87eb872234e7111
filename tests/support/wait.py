"""The one way tests wait for something: poll a condition, bounded, never a bare sleep.

`wait_until` (threads, subprocesses) and `wait_until_async` (inside an event loop, yielding to
it between polls) behave alike: True as soon as the condition holds, False once `timeout`
seconds passed without it (the condition is tried one last time). Callers assert the result and
say in the assert's message what they were waiting for, evaluated only when it fails:

    assert wait_until(lambda: outbox.count == 0, 10), agent.tail()

Timeouts are upper bounds for a slow, shared machine: no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_TIMEOUT_S = 30.0


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S, interval: float = 0.02
) -> bool:
    """Poll `predicate()` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def wait_until_async(
    predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S, interval: float = 0.005
) -> bool:
    """`wait_until` inside an event loop: the loop runs (drivers read, commit) between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


def run_async(coro: Awaitable[Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """`asyncio.run` with a bound: a test that hangs fails after `timeout` seconds instead."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())
