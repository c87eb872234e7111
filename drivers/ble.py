"""The BLE driver: bleak scanners (one per receiver) feeding presence analytics.

BlueZ reports each device cumulatively and deduplicates (a callback when its properties
change, not one per packet on air), so presence works on last-seen times with timeouts, never
on packet counts. Scanning is passive where BlueZ supports it (an advertisement monitor,
BlueZ >= 5.56 with experimental features), active otherwise. A scanner that has reported
nothing for `watchdog_s` is stopped and started again. A missing or powered-off adapter, or no
BlueZ at all, is reported through `DeviceHealth` and retried with backoff; it never ends `run`.

Raw addresses exist only in bleak's objects and for the duration of one callback, long enough
to make the counting HMAC; no log line, health message or event carries one.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Protocol

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from agent.core.backoff import Backoff
from agent.core.presence import Presence, TagClassifier
from agent.presence_config import BleConfig
from agent.protocols.ble import frames_from_bleak
from agent.sink import DeviceHealth, EventSink
from drivers.sim.ble_replay import BleReplay, TraceRecord, load_trace

log = logging.getLogger(__name__)

Callback = Callable[[BLEDevice, AdvertisementData], None]

# Flags AD values that nearly every advertiser sends (LE general/limited discoverable, BR/EDR
# not supported, simultaneous LE and BR/EDR): an advertisement monitor that matches any of them
# sees practically everything, as Home Assistant's passive scanner does.
PASSIVE_FLAGS = (0x02, 0x04, 0x06, 0x1A, 0x1E)

START_TIMEOUT_S = 30.0  # a D-Bus call that never answers counts as a failed start
STOP_TIMEOUT_S = 10.0

# MAC addresses in any usual spelling, and BlueZ object paths (dev_AA_BB_...): scrubbed from
# anything that reaches a log line or a health message.
_ADDRESS_RE = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{2}(?:[:_-][0-9A-Fa-f]{2}){5}(?![0-9A-Fa-f])")


def scrub(text: str) -> str:
    """`text` with every MAC-address-like run replaced by a placeholder."""
    return _ADDRESS_RE.sub("XX:XX:XX:XX:XX:XX", text)


class Scanner(Protocol):
    """What the driver needs of a scanner (bleak's BleakScanner has it)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ScannerFactory = Callable[[str, str, Callback], Scanner]


def system_bus_path() -> str | None:
    """The D-Bus system bus socket BlueZ is reached through (None when the address is not a path)."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    for part in address.split(";")[0].removeprefix("unix:").split(","):
        if part.startswith("path="):
            return part[5:]
    return None


def bleak_scanner(adapter: str, mode: str, callback: Callback) -> Scanner:
    """A BleakScanner on BlueZ adapter `adapter` in `mode` ("passive" or "active").

    Without a system bus there is no BlueZ to talk to: say so at once rather than let bleak try
    (cancelling bleak while it connects to a bus that is not there can leave its start hanging).
    """
    from bleak import BleakScanner  # backends load lazily; keep import cost off module import
    from bleak.args.bluez import BlueZScannerArgs, OrPattern
    from bleak.assigned_numbers import AdvertisementDataType

    if mode == "passive":
        patterns: list[OrPattern | tuple[int, AdvertisementDataType, bytes]] = [
            OrPattern(0, AdvertisementDataType.FLAGS, bytes([flags])) for flags in PASSIVE_FLAGS
        ]
        args = BlueZScannerArgs(adapter=adapter, or_patterns=patterns)
        return _BusChecked(BleakScanner(callback, scanning_mode="passive", bluez=args))
    return _BusChecked(
        BleakScanner(callback, scanning_mode="active", bluez=BlueZScannerArgs(adapter=adapter))
    )


class _BusChecked:
    """A BleakScanner whose start first checks that the system bus exists, and whose stop does
    nothing unless it started (bleak's stop of a scanner that never started can hang)."""

    def __init__(self, scanner: Scanner) -> None:
        self._scanner = scanner
        self._started = False

    async def start(self) -> None:
        bus = system_bus_path()
        if bus is not None and not os.path.exists(bus):
            raise FileNotFoundError(2, "no D-Bus system bus", bus)
        await self._scanner.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._scanner.stop()


def random_key() -> bytes:
    """A fresh random counting key (32 bytes) from the OS."""
    return secrets.token_bytes(32)


def describe(exc: BaseException) -> str:
    """One line saying why a scanner could not start, for `status` and the log."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return "no D-Bus system bus: is BlueZ installed and bluetoothd running?"
    if isinstance(exc, TimeoutError):
        return "BlueZ did not answer in time"
    text = str(exc).strip() or type(exc).__name__
    reason = getattr(exc, "reason", None)  # BleakBluetoothNotAvailableError: NO_BLUETOOTH, POWERED_OFF…
    if reason is not None and getattr(reason, "name", None):
        text = f"{text} ({reason.name.lower()})"
    return scrub(f"{type(exc).__name__}: {text}")


def demo_trace(name: str) -> Traversable:
    """A demo trace shipped with the package (`agent/demo/NAME`), found the way package data is
    (importlib.resources), wherever and however the agent is installed."""
    return importlib.resources.files("agent") / "demo" / name


def resolve_trace(path: Path) -> Path | Traversable:
    """A configured trace path; a relative one that is not found here is looked up among the
    demo traces shipped with the package (so `agent/demo/ble_door.jsonl` works from any cwd)."""
    if not path.exists() and not path.is_absolute():
        shipped = demo_trace(path.name)
        if shipped.is_file():
            return shipped
    return path


class _Receiver:
    """One adapter as the callback sees it: its name and how many reports it has given."""

    __slots__ = ("name", "heard")

    def __init__(self, name: str) -> None:
        self.name = name
        self.heard = 0  # what the watchdog watches


class BleDriver:
    """Scans every configured receiver (or plays a trace) and feeds presence analytics.

    Events reach the buffer through `sink.offer`, never waiting. `clock` gives the time events
    are stamped with (Unix seconds); `monotonic` times the watchdog and backoff.
    """

    def __init__(
        self,
        config: BleConfig,
        sink: EventSink,
        health: DeviceHealth,
        *,
        key_source: Callable[[], bytes] = random_key,
        day_offset_s: float | None = None,
        scanner_factory: ScannerFactory = bleak_scanner,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tick_s: float = 1.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self._config = config
        self._health = health
        self._factory = scanner_factory
        self._clock = clock
        self._monotonic = monotonic
        self._tick_s = tick_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        if day_offset_s is None:
            day_offset_s = float(time.localtime().tm_gmtoff)  # the key changes at local midnight
        params = config.presence_params()
        self.presence = Presence(params, sink.offer, key_source=key_source, day_offset_s=day_offset_s)
        self._classifier = TagClassifier(params.tags, frames_from_bleak)
        # A trace that cannot be read is bad config (TraceError is a ValueError): fail at start.
        self._replay_records: list[TraceRecord] = (
            load_trace(resolve_trace(config.replay)) if config.replay is not None else []
        )
        self._observe = self.presence.observe
        self._classify = self._classifier.classify
        self._receivers: dict[object, _Receiver] = {}  # by BlueZ adapter path ("/org/bluez/hci0")
        self._by_name: dict[str, _Receiver] = {}
        self._active_only: set[str] = set()  # receivers where passive scanning failed (auto mode)
        self.callback_errors = 0
        self.restarts = 0
        self.modes: dict[str, str] = {}  # the scanning mode each receiver runs in

    def on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback: one advertisement report of one device."""
        try:
            try:
                receiver = self._receivers[adv.platform_data[1]["Adapter"]]
            except (LookupError, TypeError):
                receiver = self._receiver_of(adv)
            receiver.heard += 1
            tag = self._classify(adv.manufacturer_data, adv.service_data)
            self._observe(device.address, adv.rssi, tag, receiver.name, self._clock())
        except Exception as exc:  # bleak calls this from its D-Bus handler: never raise into it
            self.callback_errors += 1
            if self.callback_errors in (1, 10, 100) or self.callback_errors % 10000 == 0:
                log.error(
                    "BLE advertisement not handled (%d so far): %s", self.callback_errors, describe(exc)
                )

    @property
    def adverts(self) -> int:
        """Advertisement reports taken so far, all receivers together."""
        return sum(r.heard for r in self._receivers.values())

    async def run(self) -> None:
        """Scan (or replay) until cancelled; failures are reported and retried, never raised."""
        if not self._config.enabled:
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._tick_loop())
            if self._config.replay is not None:
                group.create_task(self._replay())
            else:
                for adapter in self._config.adapters():
                    group.create_task(self._scan_loop(adapter))

    # --- internals -------------------------------------------------------------------------

    def _receiver_of(self, adv: AdvertisementData) -> _Receiver:
        try:
            path = adv.platform_data[1]["Adapter"]  # BlueZ's Device1 properties
        except (LookupError, TypeError):
            path = None  # another backend: one receiver
        receiver = self._receivers.get(path)
        if receiver is None:
            if isinstance(path, str) and path.startswith("/org/bluez/"):
                name = path.rsplit("/", 1)[-1]
            else:
                name = self._config.adapter
            receiver = self._receivers[path] = self._receiver(name)
        return receiver

    def _receiver(self, name: str) -> _Receiver:
        receiver = self._by_name.get(name)
        if receiver is None:
            receiver = self._by_name[name] = _Receiver(name)
        return receiver

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                self.presence.tick(self._clock())
            except Exception as exc:
                log.error("BLE presence tick failed: %s", describe(exc))

    async def _replay(self) -> None:
        config = self._config
        replay = BleReplay(self._replay_records, speed=config.replay_speed, loop=config.replay_loop)
        self._health.report("ble", "replay", True)
        log.info("BLE: replaying %s at %gx instead of scanning", config.replay, config.replay_speed)
        await replay.run(self.on_advertisement)

    async def _scan_loop(self, adapter: str) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            scanner, error = await self._start_scanner(adapter)
            if scanner is None:
                delay = backoff.next_delay()
                self._health.report("ble", adapter, False, error)
                log.warning("BLE scanner on %s not started (%s); retrying in %.1f s", adapter, error, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._health.report("ble", adapter, True)
            log.info("BLE scanner on %s started (%s)", adapter, self.modes[adapter])
            heard_before = self._receiver(adapter).heard
            try:
                await self._watch(adapter)
            finally:
                await self._stop(scanner, adapter)
            self.restarts += 1
            if self._config.scanning_mode == "auto" and self._receiver(adapter).heard == heard_before:
                # A monitor BlueZ accepted but that never matched anything: active from now on.
                self._active_only.add(adapter)
            log.warning(
                "BLE scanner on %s silent for %.0f s: restarting it", adapter, self._config.watchdog_s
            )

    async def _start_scanner(self, adapter: str) -> tuple[Scanner | None, str]:
        wanted = self._config.scanning_mode
        modes = ["active"] if wanted == "active" or adapter in self._active_only else ["passive"]
        if wanted == "auto" and modes == ["passive"]:
            modes.append("active")  # BlueZ without advertisement monitors: fall back at once
        error = ""
        for mode in modes:
            scanner: Scanner | None = None
            try:
                scanner = self._factory(adapter, mode, self.on_advertisement)
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
                # arrives as the inner call fails, and the driver would then never stop
                async with asyncio.timeout(START_TIMEOUT_S):
                    await scanner.start()
            except Exception as exc:
                error = describe(exc)
                if scanner is not None:
                    await self._stop(scanner, adapter)
                continue
            if wanted == "auto" and mode == "active" and error:
                self._active_only.add(adapter)
                log.info("BLE passive scanning unavailable on %s (%s): scanning actively", adapter, error)
            self.modes[adapter] = mode
            return scanner, ""
        return None, error

    async def _watch(self, adapter: str) -> None:
        """Returns once the receiver has reported nothing for `watchdog_s`."""
        watchdog = self._config.watchdog_s
        period = min(watchdog / 4, 5.0)
        receiver = self._receiver(adapter)
        count = receiver.heard
        quiet_since = self._monotonic()
        while True:
            await asyncio.sleep(period)
            now_count = receiver.heard
            if now_count != count:
                count = now_count
                quiet_since = self._monotonic()
            elif self._monotonic() - quiet_since >= watchdog:
                return

    async def _stop(self, scanner: Scanner, adapter: str) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await scanner.stop()
        except Exception as exc:  # a scanner that lost its adapter may fail to stop: it is gone anyway
            log.debug("BLE scanner on %s did not stop cleanly: %s", adapter, describe(exc))
