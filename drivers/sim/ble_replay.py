"""Plays a recorded BLE trace through the same callback a live bleak scanner calls.

A trace is JSON lines, one advertisement report each:

    {"t": 12.5, "address": "5A:1B:..", "rssi": -61, "manufacturer_data": {"76": "0215..."},
     "service_data": {"0000feaa-0000-1000-8000-00805f9b34fb": "00e7..."}, "local_name": null,
     "adapter": "hci0"}

`t` is seconds from the start of the recording; manufacturer data is keyed by the company id
in decimal, values are hex. Each record becomes a real bleak `BLEDevice` and
`AdvertisementData`, built the way bleak's BlueZ backend builds them (the D-Bus object path and
the Device1 properties in `details` and `platform_data`), so the driver cannot tell a replay
from a radio.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

Callback = Callable[[BLEDevice, AdvertisementData], None]

LOOP_GAP_S = 1.0  # silence between the end of a pass and the start of the next


class TraceError(ValueError):
    """A trace file that cannot be read: names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One recorded advertisement report."""

    t: float
    address: str
    rssi: int
    manufacturer_data: dict[int, bytes]
    service_data: dict[str, bytes]
    local_name: str | None = None
    adapter: str = "hci0"


def parse_record(obj: Any) -> TraceRecord:
    """A trace line's JSON object as a TraceRecord; raises ValueError when it does not fit."""
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    t = obj.get("t")
    rssi = obj.get("rssi")
    address = obj.get("address")
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0 <= t < 1e9:
        raise ValueError("t must be a number of seconds from 0 to 1e9")
    if not isinstance(rssi, int) or isinstance(rssi, bool):
        raise ValueError("rssi must be an integer (dBm)")
    if not isinstance(address, str) or not address:
        raise ValueError("address must be a string")
    local_name = obj.get("local_name")
    adapter = obj.get("adapter", "hci0")
    if local_name is not None and not isinstance(local_name, str):
        raise ValueError("local_name must be a string or null")
    if not isinstance(adapter, str) or not adapter:
        raise ValueError("adapter must be a string")
    manufacturer = obj.get("manufacturer_data") or {}
    service = obj.get("service_data") or {}
    if not isinstance(manufacturer, dict) or not isinstance(service, dict):
        raise ValueError("manufacturer_data and service_data must be objects")
    try:
        md = {int(k): bytes.fromhex(v) for k, v in manufacturer.items()}
        sd = {str(k).lower(): bytes.fromhex(v) for k, v in service.items()}
    except (TypeError, ValueError):
        raise ValueError("manufacturer_data and service_data values must be hex strings") from None
    return TraceRecord(float(t), address, rssi, md, sd, local_name, adapter)


def load_trace(path: str | Path | Traversable) -> list[TraceRecord]:
    """Every record of a trace file (a path, or package data from importlib.resources), in time order."""
    records: list[TraceRecord] = []
    try:
        with open(path, encoding="utf-8") if isinstance(path, str) else path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(parse_record(json.loads(line)))
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    raise TraceError(f"{path}, line {number}: {exc}") from None
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    records.sort(key=lambda r: r.t)
    return records


def bleak_objects(
    record: TraceRecord, device: BLEDevice | None = None
) -> tuple[BLEDevice, AdvertisementData]:
    """The BLEDevice and AdvertisementData bleak's BlueZ backend would hand its callback.

    Pass the `device` made for an earlier record of the same address to have it reused: bleak,
    too, keeps one BLEDevice per D-Bus device object.
    """
    adapter_path = f"/org/bluez/{record.adapter}"
    path = f"{adapter_path}/dev_{record.address.replace(':', '_')}"
    service_uuids = list(record.service_data)
    props: dict[str, Any] = {
        "Address": record.address,
        "AddressType": "random",
        "Alias": record.local_name or record.address.replace(":", "-"),
        "Adapter": adapter_path,
        "Paired": False,
        "Trusted": False,
        "Blocked": False,
        "LegacyPairing": False,
        "Connected": False,
        "UUIDs": service_uuids,
        "ServicesResolved": False,
        "RSSI": record.rssi,
        "ManufacturerData": dict(record.manufacturer_data),
        "ServiceData": dict(record.service_data),
    }
    if record.local_name is not None:
        props["Name"] = record.local_name
    adv = AdvertisementData(
        local_name=record.local_name,
        manufacturer_data=dict(record.manufacturer_data),
        service_data=dict(record.service_data),
        service_uuids=service_uuids,
        tx_power=None,
        rssi=record.rssi,
        platform_data=(path, props),
    )
    if device is None:
        device = BLEDevice(record.address, record.local_name, {"path": path, "props": props})
    return device, adv


class BleReplay:
    """Feeds a trace's records to a callback at their recorded pace (times `speed`).

    With `loop`, the trace starts over after each pass, for as long as `run` is not cancelled.
    """

    def __init__(
        self,
        records: Sequence[TraceRecord],
        *,
        speed: float = 1.0,
        loop: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self._records = sorted(records, key=lambda r: r.t)
        self._speed = speed
        self._loop = loop
        self._clock = clock
        self._sleep = sleep
        self.played = 0
        self.passes = 0

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> BleReplay:
        """A replay of the trace at `path` (raises TraceError)."""
        return cls(load_trace(path), **kwargs)

    async def run(self, callback: Callback) -> None:
        """Play the trace (forever with `loop`); returns after one pass without it."""
        if not self._records:
            return
        prepared = list(self._prepare(self._records))
        t0 = self._records[0].t
        span = self._records[-1].t - t0 + LOOP_GAP_S
        start = self._clock()
        while True:
            for index, (t, device, adv) in enumerate(prepared):
                delay = start + (t - t0) / self._speed - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                elif index % 256 == 0:
                    await self._sleep(0)  # a burst still lets the rest of the loop run
                callback(device, adv)
                self.played += 1
            self.passes += 1
            if not self._loop:
                return
            start += span / self._speed

    @staticmethod
    def _prepare(records: Iterable[TraceRecord]) -> Iterable[tuple[float, BLEDevice, AdvertisementData]]:
        devices: dict[tuple[str, str], BLEDevice] = {}
        for record in records:
            key = (record.adapter, record.address)
            device, adv = bleak_objects(record, devices.get(key))
            devices[key] = device
            yield record.t, device, adv
