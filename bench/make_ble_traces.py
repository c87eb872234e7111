"""Writes the demo BLE traces under agent/demo/ (deterministic: same seed, same bytes).

    /work/main/.venv/bin/python bench/make_ble_traces.py

The traces are recorded-style: what bleak's BlueZ backend reports (one record each time a
device's properties change, here every few seconds per device and receiver), in the JSON
lines format of drivers/sim/ble_replay.py.

- ble_door.jsonl: one receiver (hci0) at a shop door, 15 minutes. Phones with random private
  addresses walk in, stay a while and walk out; some only pass by outside. Each phone changes
  its address (and its payload) about every 15 minutes, as iOS and Android do.
- ble_aisle.jsonl: a busy aisle, 10 minutes, heard by two receivers: hci0 at the front and
  hci1 in the aisle.
- ble_staff.jsonl: configured tags on hci0, 10 minutes: three staff badges (iBeacon), two
  baskets (Eddystone-UID), and the member app advertising its rotating token as an iBeacon.

The config that goes with them (also in config/demo.toml's [ble] section when wired):

    [[ble.zones]]  name = "door",  adapter = "hci0", min_rssi = -60
    [[ble.zones]]  name = "aisle", adapter = "hci1"
    [[ble.zones]]  name = "shop",  min_rssi = -92
    [[ble.tags]]   name = "staff",  kind = "staff",      ibeacon_uuid = STAFF_UUID
    [[ble.tags]]   name = "basket", kind = "basket",     eddystone_namespace = BASKET_NAMESPACE
    [[ble.tags]]   name = "member", kind = "member_app", ibeacon_uuid = MEMBER_UUID
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from pathlib import Path

SEED = 20261123
OUT = Path(__file__).resolve().parent.parent / "agent" / "demo"

STAFF_UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
MEMBER_UUID = "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"
BASKET_NAMESPACE = "5c3a9f1e7b2d4c6a8e01"
EDDYSTONE_KEY = "0000feaa-0000-1000-8000-00805f9b34fb"
APPLE, MICROSOFT, SAMSUNG = 76, 6, 117

ROTATION_S = 900.0  # phones change their address about every 15 minutes
OUT_OF_RANGE_DBM = -95

# A path: (time, rssi) waypoints, linear in between; None where the receiver hears nothing.
Path_ = list[tuple[float, float]]


def random_address(rng: random.Random) -> str:
    """A resolvable private address: the two top bits of the first octet are 01."""
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = 0x40 | (octets[0] & 0x3F)
    return ":".join(f"{o:02X}" for o in octets)


def static_address(rng: random.Random) -> str:
    """A static random address (badges and beacons): the two top bits are 11."""
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = 0xC0 | (octets[0] & 0x3F)
    return ":".join(f"{o:02X}" for o in octets)


def phone_payload(rng: random.Random, vendor: str) -> dict[str, str]:
    """Manufacturer data like a phone's (it changes whenever the address does)."""
    if vendor == "apple":  # Nearby Info (type 0x10)
        return {str(APPLE): "1005" + bytes(rng.randrange(256) for _ in range(5)).hex()}
    if vendor == "microsoft":  # Swift Pair / CDP beacon
        return {str(MICROSOFT): "0109" + bytes(rng.randrange(256) for _ in range(24)).hex()}
    return {str(SAMSUNG): "42040180" + bytes(rng.randrange(256) for _ in range(8)).hex()}


def ibeacon(uuid_text: str, major: int, minor: int, tx_power: int = -59) -> dict[str, str]:
    """iBeacon manufacturer data (Apple, type 0x02, length 0x15)."""
    body = b"\x02\x15" + uuid.UUID(uuid_text).bytes + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
    return {str(APPLE): (body + (tx_power & 0xFF).to_bytes(1, "big")).hex()}


def eddystone_uid(namespace: str, instance: str, tx_power: int = -20) -> dict[str, str]:
    """Eddystone-UID service data (frame 0x00 with the two RFU bytes)."""
    return {EDDYSTONE_KEY: "00" + f"{tx_power & 0xFF:02x}" + namespace + instance + "0000"}


def rssi_at(path: Path_, t: float) -> float | None:
    if not path or t < path[0][0] or t > path[-1][0]:
        return None
    for (t0, r0), (t1, r1) in zip(path, path[1:], strict=False):
        if t0 <= t <= t1:
            return r0 if t1 == t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return path[-1][1]


def sample(
    rng: random.Random,
    records: list[dict],
    paths: dict[str, Path_],
    identity: Callable[[float], tuple[str, dict[str, str], dict[str, str]]],
    period: float,
    duration: float,
    local_name: str | None = None,
) -> None:
    """Reports of one device on each receiver along its paths, every `period` s or so."""
    for adapter, path in paths.items():
        if not path:
            continue
        t = max(0.0, path[0][0]) + rng.uniform(0, period)
        while t <= min(duration, path[-1][0]):
            level = rssi_at(path, t)
            if level is not None:
                rssi = round(level + rng.gauss(0, 3))
                if rssi > OUT_OF_RANGE_DBM:
                    address, md, sd = identity(t)
                    records.append(
                        {
                            "t": round(t, 2),
                            "address": address,
                            "rssi": max(-100, min(-30, rssi)),
                            "manufacturer_data": md,
                            "service_data": sd,
                            "local_name": local_name,
                            "adapter": adapter,
                        }
                    )
            t += period * rng.uniform(0.7, 1.3)


def rotating_phone(rng: random.Random, vendor: str) -> Callable[[float], tuple[str, dict, dict]]:
    """A phone's identity over time: a new address and payload at each rotation."""
    period = ROTATION_S + rng.uniform(-60, 60)
    phase = rng.uniform(0, period)
    identities: dict[int, tuple[str, dict, dict]] = {}

    def identity(t: float) -> tuple[str, dict, dict]:
        epoch = int((t + phase) // period)
        if epoch not in identities:
            identities[epoch] = (random_address(rng), phone_payload(rng, vendor), {})
        return identities[epoch]

    return identity


def pick_vendor(rng: random.Random) -> str:
    return rng.choices(["apple", "microsoft", "samsung"], weights=[60, 25, 15])[0]


def door_trace(rng: random.Random) -> list[dict]:
    duration = 900.0
    records: list[dict] = []
    for _ in range(30):
        start = rng.uniform(-60, duration - 30)
        if rng.random() < 0.25:  # passes by outside: never strong, never inside
            path = [(start, -90.0), (start + 8, -68.0), (start + 16, -90.0)]
        else:
            dwell = rng.uniform(40, 420)
            inside = rng.uniform(-84, -70)
            path = [
                (start, -90.0),
                (start + 8, -52.0),
                (start + 14, -50.0),
                (start + 22, inside),
                (start + 22 + dwell, inside + rng.uniform(-4, 4)),
                (start + 30 + dwell, -51.0),
                (start + 36 + dwell, -52.0),
                (start + 44 + dwell, -92.0),
            ]
        sample(rng, records, {"hci0": path}, rotating_phone(rng, pick_vendor(rng)), 5.0, duration)
    return records


def aisle_trace(rng: random.Random) -> list[dict]:
    duration = 600.0
    records: list[dict] = []
    for _ in range(34):
        start = rng.uniform(-120, duration - 30)
        browse = rng.uniform(30, 240)
        front = rng.uniform(-78, -66)
        aisle = rng.uniform(-66, -54)
        paths = {
            # walking from the front to the aisle: the front receiver fades as the aisle's grows
            "hci0": [
                (start, -60.0),
                (start + 15, front),
                (start + 15 + browse, front - 3),
                (start + 30 + browse, -62.0),
            ],
            "hci1": [
                (start, -85.0),
                (start + 15, aisle),
                (start + 15 + browse, aisle + 2),
                (start + 30 + browse, -86.0),
            ],
        }
        sample(rng, records, paths, rotating_phone(rng, pick_vendor(rng)), 6.0, duration)
    return records


def staff_trace(rng: random.Random) -> list[dict]:
    duration = 600.0
    records: list[dict] = []
    badges = [
        # always on shift, walks to the door twice
        [
            (0, -74.0),
            (150, -76.0),
            (160, -52.0),
            (220, -50.0),
            (230, -75.0),
            (420, -72.0),
            (430, -51.0),
            (470, -52.0),
            (480, -74.0),
            (600, -75.0),
        ],
        # arrives through the door at 60 s, leaves at 480 s
        [
            (60, -90.0),
            (68, -52.0),
            (76, -50.0),
            (84, -78.0),
            (460, -77.0),
            (470, -51.0),
            (476, -52.0),
            (484, -93.0),
        ],
        # on a break from 200 s to 400 s
        [(0, -80.0), (190, -80.0), (196, -52.0), (204, -93.0)],
        [(396, -93.0), (404, -52.0), (410, -79.0), (600, -81.0)],
    ]
    for minor, path in ((1, badges[0]), (2, badges[1]), (3, badges[2]), (3, badges[3])):
        address = static_address(random.Random(minor))  # a badge keeps its address

        def badge(t: float, address: str = address, minor: int = minor) -> tuple[str, dict, dict]:
            return address, ibeacon(STAFF_UUID, 100, minor), {}

        sample(rng, records, {"hci0": [(float(t), r) for t, r in path]}, badge, 3.0, duration)
    baskets = {
        "00000000b001": [(0, -52.0), (100, -52.0), (110, -72.0), (380, -80.0), (392, -52.0), (600, -51.0)],
        "00000000b002": [(0, -53.0), (260, -53.0), (270, -83.0), (600, -84.0)],
    }
    for instance, path in baskets.items():
        address = static_address(random.Random(instance))

        def basket(t: float, address: str = address, instance: str = instance) -> tuple[str, dict, dict]:
            return address, {}, eddystone_uid(BASKET_NAMESPACE, instance)

        sample(
            rng, records, {"hci0": [(float(t), r) for t, r in path]}, basket, 3.0, duration, local_name=None
        )
    # The member app: an iBeacon whose major/minor is a token rotated every 150 s, sent from
    # the phone's random address, which rotates with it.
    tokens = {
        epoch: (rng.randrange(1, 0xFFFF), rng.randrange(1, 0xFFFF), random_address(rng)) for epoch in range(5)
    }

    def member(t: float) -> tuple[str, dict, dict]:
        major, minor, address = tokens[int(t // 150)]
        return address, ibeacon(MEMBER_UUID, major, minor), {}

    path = [
        (150.0, -90.0),
        (158.0, -52.0),
        (164.0, -51.0),
        (172.0, -76.0),
        (500.0, -74.0),
        (508.0, -52.0),
        (514.0, -53.0),
        (522.0, -93.0),
    ]
    sample(rng, records, {"hci0": path}, member, 3.0, duration)
    return records


def write(name: str, records: list[dict]) -> Path:
    records.sort(key=lambda r: (r["t"], r["adapter"], r["address"]))
    path = OUT / name
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def main() -> None:
    made: dict[str, list[dict]] = {}
    for name, make in (
        ("ble_door.jsonl", door_trace),
        ("ble_aisle.jsonl", aisle_trace),
        ("ble_staff.jsonl", staff_trace),
    ):
        rng = random.Random(f"{SEED}:{name}")
        made[name] = make(rng)
        path = write(name, list(made[name]))
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
    # the demo store: phones at the door plus staff badges, baskets and the member app
    path = write("ble_store.jsonl", made["ble_door.jsonl"] + made["ble_staff.jsonl"])
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
