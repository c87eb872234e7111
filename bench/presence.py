"""Throughput of the BLE hot path: bleak callback -> parse/match -> presence analytics.

    /work/main/.venv/bin/python bench/presence.py [--adverts 200000] [--devices 2000] [--repeat 3]

Feeds real bleak BLEDevice/AdvertisementData objects (built as the BlueZ backend builds them)
through `BleDriver.on_advertisement`, with the time passed in (simulated: every device reports
about once a second, presence ticks once a simulated second), into a sink that only counts.
The mix: anonymous phones (Apple, Microsoft, Samsung payloads) whose addresses rotate every 15
simulated minutes, plus staff badges (iBeacon), baskets (Eddystone-UID) and member-app tokens.
Prints adverts per second (wall) and CPU microseconds per advert, for the whole path and for
its parts, best and median of a few repeats. Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core.presence import Presence, TagClassifier  # noqa: E402
from agent.presence_config import BleConfig  # noqa: E402
from agent.protocols.ble import BleParseError, frames_from_bleak  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from drivers.ble import BleDriver  # noqa: E402
from drivers.sim.ble_replay import TraceRecord, bleak_objects  # noqa: E402

STAFF_UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
MEMBER_UUID = "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"
BASKET_NAMESPACE = "5c3a9f1e7b2d4c6a8e01"

CONFIG = BleConfig.model_validate(
    {
        "interval_s": 60,
        "zones": [
            {"name": "door", "adapter": "hci0", "min_rssi": -60},
            {"name": "aisle", "adapter": "hci1"},
            {"name": "shop", "min_rssi": -92},
        ],
        "tags": [
            {"name": "staff", "kind": "staff", "ibeacon_uuid": STAFF_UUID},
            {"name": "basket", "kind": "basket", "eddystone_namespace": BASKET_NAMESPACE},
            {"name": "member", "kind": "member_app", "ibeacon_uuid": MEMBER_UUID},
        ],
    }
)


class CountingSink:
    """An EventSink that only counts what it is offered."""

    def __init__(self) -> None:
        self.offered = 0

    def offer(self, event: object) -> None:
        self.offered += 1

    async def commit(self, events, dedup=None):  # pragma: no cover - not used on this path
        raise NotImplementedError


class NoHealth:
    def report(self, kind: str, name: str, up: bool, error: str | None = None) -> None:
        pass


def address(rng: random.Random) -> str:
    return ":".join(
        f"{(rng.randrange(256) & 0x3F | 0x40) if i == 0 else rng.randrange(256):02X}" for i in range(6)
    )


def ibeacon(uuid_hex: str, major: int, minor: int) -> dict[int, bytes]:
    body = (
        bytes.fromhex("0215" + uuid_hex.replace("-", ""))
        + major.to_bytes(2, "big")
        + minor.to_bytes(2, "big")
    )
    return {76: body + b"\xc5"}


def make_stream(rng: random.Random, devices: int, adverts: int) -> list[tuple[float, object, object]]:
    """(time, BLEDevice, AdvertisementData) in time order, each device about once a second."""
    rate = float(devices)  # adverts per simulated second
    phones = max(1, devices - devices // 20)
    stream = []
    prepared: dict[tuple[int, int], tuple[object, object]] = {}
    for i in range(adverts):
        t = i / rate
        slot = rng.randrange(devices)
        epoch = int((t + slot * 7.3) // 900)  # each phone rotates its address every 15 minutes
        rssi_bucket = rng.randrange(8)
        key = (slot, epoch * 8 + rssi_bucket)
        pair = prepared.get(key)
        if pair is None:
            local = random.Random(f"{slot}:{epoch}")
            adapter = "hci0" if slot % 3 else "hci1"
            rssi = -50 - local.randrange(40) - rssi_bucket
            if slot < phones:
                vendor = slot % 10
                if vendor < 6:
                    md = {76: bytes.fromhex("1005") + local.randbytes(5)}
                elif vendor < 9:
                    md = {6: bytes.fromhex("0109") + local.randbytes(24)}
                else:
                    md = {117: bytes.fromhex("42040180") + local.randbytes(8)}
                sd: dict[str, bytes] = {}
            elif slot % 3 == 0:
                md, sd = ibeacon(STAFF_UUID, 100, slot), {}
            elif slot % 3 == 1:
                md = {}
                sd = {
                    "0000feaa-0000-1000-8000-00805f9b34fb": bytes.fromhex("00ec" + BASKET_NAMESPACE)
                    + slot.to_bytes(6, "big")
                    + b"\0\0"
                }
            else:
                md, sd = ibeacon(MEMBER_UUID, epoch & 0xFFFF, slot), {}
            record = TraceRecord(t, address(local), rssi, md, sd, None, adapter)
            pair = prepared[key] = bleak_objects(record)
        stream.append((t, *pair))
    return stream


def run_driver(stream) -> tuple[float, float, BleDriver, CountingSink]:
    now = [0.0]
    sink = CountingSink()
    driver = BleDriver(
        CONFIG,
        sink,
        NoHealth(),
        key_source=lambda: b"bench-key-0123456789abcdef",
        day_offset_s=0.0,
        clock=lambda: now[0],
    )
    callback = driver.on_advertisement
    tick = driver.presence.tick
    next_tick = 1.0
    wall, cpu = time.perf_counter(), time.process_time()
    for t, device, adv in stream:
        now[0] = t
        if t >= next_tick:
            tick(t)
            next_tick += 1.0
        callback(device, adv)
    return time.perf_counter() - wall, time.process_time() - cpu, driver, sink


def run_classify(stream) -> tuple[float, float]:
    classifier = TagClassifier(CONFIG.presence_params().tags, frames_from_bleak)
    classify = classifier.classify
    wall, cpu = time.perf_counter(), time.process_time()
    for _, _, adv in stream:
        classify(adv.manufacturer_data, adv.service_data)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_presence(stream) -> tuple[float, float]:
    classifier = TagClassifier(CONFIG.presence_params().tags, frames_from_bleak)
    items = [
        (
            t,
            d.address,
            a.rssi,
            classifier.classify(a.manufacturer_data, a.service_data),
            a.platform_data[1]["Adapter"][11:],
        )
        for t, d, a in stream
    ]
    presence = Presence(
        CONFIG.presence_params(), lambda e: None, key_source=lambda: b"bench-key-0123456789abcdef"
    )
    observe, tick = presence.observe, presence.tick
    next_tick = 1.0
    wall, cpu = time.perf_counter(), time.process_time()
    for t, addr, rssi, tag, adapter in items:
        if t >= next_tick:
            tick(t)
            next_tick += 1.0
        observe(addr, rssi, tag, adapter, t)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_parse_all(stream) -> tuple[float, float]:
    """For reference: the parser on every advert, no shortcut and no cache."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _, _, adv in stream:
        try:
            frames_from_bleak(adv.manufacturer_data, adv.service_data)
        except BleParseError:
            pass
    return time.perf_counter() - wall, time.process_time() - cpu


def report(name: str, n: int, runs: list[tuple[float, float]]) -> None:
    """Best and median of the repeats: this machine is shared, the best is the least disturbed."""
    walls = sorted(w for w, _ in runs)
    cpus = sorted(c for _, c in runs)
    mid = len(runs) // 2
    print(
        f"{name:<34} {n / walls[0]:>10,.0f} adverts/s best, {n / walls[mid]:>10,.0f} median"
        f"   {cpus[0] / n * 1e6:5.2f} µs CPU/advert best, {cpus[mid] / n * 1e6:5.2f} median"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adverts", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print_machine()
    stream = make_stream(random.Random(7), args.devices, args.adverts)
    n = len(stream)
    print(
        f"{n:,} adverts from {args.devices:,} devices over {stream[-1][0]:.0f} simulated s, best of {args.repeat}"
    )
    driver_runs = [run_driver(stream) for _ in range(args.repeat)]
    report("driver callback (whole path)", n, [(w, c) for w, c, _, _ in driver_runs])
    report("  tag classification", n, [run_classify(stream) for _ in range(args.repeat)])
    report("  presence analytics", n, [run_presence(stream) for _ in range(args.repeat)])
    report("  (parser on every advert, uncached)", n, [run_parse_all(stream) for _ in range(args.repeat)])
    _, _, driver, sink = driver_runs[-1]
    tags, anon = driver.presence.tracked()
    print(
        f"events offered: {sink.offered:,}; tracked at the end: {tags} tags, {anon} anonymous; "
        f"callback errors: {driver.callback_errors}"
    )


if __name__ == "__main__":
    main()
