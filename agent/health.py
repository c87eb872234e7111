"""Per-device health as drivers report it: shown by `status`, `doctor`, /healthz and /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class DeviceState:
    kind: str
    name: str
    up: bool
    since: float
    error: str | None = None
    last_event: float | None = None


class HealthBoard:
    """Thread-safe board of device states (implements `agent.sink.DeviceHealth`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], DeviceState] = {}
        self.last_error: str | None = None

    def report(self, kind: str, name: str, up: bool, error: str | None = None) -> None:
        """Record a device's state; a change of up/down restarts its `since`."""
        with self._lock:
            now = self._clock()
            current = self._devices.get((kind, name))
            if current is None or current.up != up:
                current = DeviceState(kind, name, up, now)
                self._devices[(kind, name)] = current
            current.error = error
            if error:
                self.last_error = f"{kind}:{name}: {error}"

    def seen(self, kind: str, name: str) -> None:
        """A device produced an event just now."""
        with self._lock:
            current = self._devices.get((kind, name))
            if current is not None:
                current.last_event = self._clock()

    def snapshot(self) -> list[dict[str, object]]:
        """Every device's state as plain dicts, sorted by kind and name."""
        with self._lock:
            return [asdict(d) for _, d in sorted(self._devices.items())]
