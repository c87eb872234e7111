"""The BLE driver (drivers/ble.py) and trace replay (drivers/ble_replay.py).

No BLE radio exists on this machine, so the radio is the one thing stood in for: recorded
traces (agent/demo/ble_*.jsonl, made by bench/make_ble_traces.py) are fed through the same
`on_advertisement` callback bleak calls, as real bleak BLEDevice/AdvertisementData objects,
and a fake scanner factory plays a scanner that goes silent. The missing adapter is the real
thing: bleak's BleakScanner against a machine without BlueZ or D-Bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakBluetoothNotAvailableReason, BleakError
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer import Outbox
from agent.core.envelope import Event, Uuid7
from agent.presence_config import BleConfig
from agent.sink import Committed, Dedup
from drivers.ble import BleDriver, bleak_scanner, demo_trace, describe, resolve_trace, scrub
from drivers.sim.ble_replay import BleReplay, TraceError, TraceRecord, bleak_objects, load_trace, parse_record
from tests.support.wait import wait_until_async

T0 = 1_800_000_000.0
# The identities bench/make_ble_traces.py gives its tags.
STAFF_UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
MEMBER_UUID = "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"
BASKET_NAMESPACE = "5c3a9f1e7b2d4c6a8e01"


def demo_config(**overrides) -> BleConfig:
    base = {
        "interval_s": 60,
        "min_count": 3,
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
    base.update(overrides)
    return BleConfig.model_validate(base)


class RecordingSink:
    """An EventSink that keeps what it is given, answering commits as the real buffer does."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._stems = Uuid7()

    def offer(self, event: Event) -> None:
        self.events.append(event)

    async def commit(self, events: Sequence[Event], dedup: Dedup | None = None) -> Committed:
        first_seq = len(self.events) + 1
        self.events.extend(events)
        return Committed(stems=((self._stems.stem(int(T0 * 1000)), len(events)),), first_seq=first_seq)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]


def test_recording_sink_answers_commits_as_the_real_buffer_does(tmp_path: Path) -> None:
    events = [Event("presence.arrive", {"n": i}, "ble") for i in range(3)]

    async def both() -> tuple[Committed, Committed]:
        box = Outbox(tmp_path / "buffer.db").start()
        try:
            return await RecordingSink().commit(events), await box.commit(events)
        finally:
            box.close()

    recorded, real = asyncio.run(both())
    for committed in (recorded, real):
        assert committed.count == 3 and not committed.duplicate
        assert len(set(committed.ids)) == 3 and all(len(i) == 36 for i in committed.ids)
        assert list(committed.seqs) == [1, 2, 3]


class RecordingHealth:
    def __init__(self) -> None:
        self.reports: list[tuple[str, str, bool, str | None]] = []

    def report(self, kind: str, name: str, up: bool, error: str | None = None) -> None:
        self.reports.append((kind, name, up, error))

    def of(self, name: str) -> list[tuple[str, str, bool, str | None]]:
        return [r for r in self.reports if r[1] == name]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def replay_through(
    driver: BleDriver, clock: FakeClock, records: list[TraceRecord], tail_s: float = 120
) -> None:
    """Every record through the driver's callback at its own time, ticking once a second."""
    start = clock.now
    devices: dict[tuple[str, str], BLEDevice] = {}
    next_tick = start + 1
    for record in records:
        while next_tick <= start + record.t:
            clock.now = next_tick
            driver.presence.tick(next_tick)
            next_tick += 1
        clock.now = start + record.t
        device, adv = bleak_objects(record, devices.get((record.adapter, record.address)))
        devices[(record.adapter, record.address)] = device
        driver.on_advertisement(device, adv)
    end = clock.now + tail_s
    while next_tick <= end:
        clock.now = next_tick
        driver.presence.tick(next_tick)
        next_tick += 1


def make_driver(
    cfg: BleConfig | None = None, **kwargs
) -> tuple[BleDriver, RecordingSink, RecordingHealth, FakeClock]:
    sink, health, clock = RecordingSink(), RecordingHealth(), FakeClock()
    kwargs.setdefault("clock", clock)
    kwargs.setdefault("key_source", lambda: b"test-key-0123456789abcdef")
    kwargs.setdefault("day_offset_s", 0.0)
    driver = BleDriver(cfg or demo_config(), sink, health, **kwargs)
    return driver, sink, health, clock


# --- replayed traces through the callback -----------------------------------------------------------


def test_staff_trace_gives_tag_presence_events() -> None:
    records = load_trace(demo_trace("ble_staff.jsonl"))
    driver, sink, _, clock = make_driver()
    replay_through(driver, clock, records)
    assert driver.adverts == len(records) and driver.callback_errors == 0
    arrivals = sink.of("presence.arrive")
    leaves = sink.of("presence.leave")
    staff = sorted({e.data["tag"] for e in arrivals if e.data["kind"] == "staff"})
    assert staff == ["staff:00640001", "staff:00640002", "staff:00640003"]
    # Badge 3 goes on a break (out of range for 200 s) and comes back: two visits.
    assert sum(e.data["tag"] == "staff:00640003" for e in arrivals) == 2
    # Every visit ends once the trace is over, and each leave's dwell is its visit.
    assert sorted((e.data["tag"], e.data.get("token")) for e in arrivals) == sorted(
        (e.data["tag"], e.data.get("token")) for e in leaves
    )
    assert all(e.data["dwell_s"] > 0 for e in leaves)
    # The member app rotates its token every 150 s: each token is its own visit, token upstream.
    member = [e for e in arrivals if e.data["kind"] == "member_app"]
    tokens = {e.data["token"] for e in member}
    assert len(tokens) == len(member) >= 2
    assert all(e.data["tag"] == "member" and len(e.data["token"]) == 8 for e in member)
    # Baskets start in the corral by the door.
    assert {e.data["zone"] for e in arrivals if e.data["kind"] == "basket"} == {"door"}
    assert not [e for e in sink.of("traffic.summary") if e.data["entered"]]  # tags are not traffic


def test_door_trace_gives_only_traffic_summaries() -> None:
    records = load_trace(demo_trace("ble_door.jsonl"))
    driver, sink, _, clock = make_driver()
    replay_through(driver, clock, records)
    assert {e.type for e in sink.events} == {"traffic.summary"}
    shop = [e.data for e in sink.events if e.data["zone"] == "shop"]
    entered = sum(s["entered"] or 0 for s in shop)
    distinct = len({r.address for r in records})
    assert 0 < entered <= distinct + 5  # counts are of addresses: a rotation is a new one
    assert shop[-1]["present"] == 0
    for summary in sink.events:
        for name in summary.data["suppressed"]:
            assert summary.data[name] is None


def test_aisle_trace_places_devices_by_the_receiver_that_hears_them_best() -> None:
    records = load_trace(demo_trace("ble_aisle.jsonl"))
    assert {r.adapter for r in records} == {"hci0", "hci1"}
    driver, sink, _, clock = make_driver(demo_config(min_count=1))
    replay_through(driver, clock, records)
    entered = {zone: 0 for zone in ("door", "aisle", "shop")}
    for event in sink.of("traffic.summary"):
        entered[event.data["zone"]] += event.data["entered"]
    assert entered["aisle"] > 0 and entered["shop"] > 0


def test_no_address_reaches_events_logs_or_health(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    records = [*load_trace(demo_trace("ble_door.jsonl")), *load_trace(demo_trace("ble_staff.jsonl"))]
    records.sort(key=lambda r: r.t)
    driver, sink, health, clock = make_driver(demo_config(min_count=1))
    replay_through(driver, clock, records)
    # A callback failure is logged: its message must not carry the address either.
    driver.on_advertisement(BLEDevice(records[0].address, None, None), None)  # type: ignore[arg-type]
    assert driver.callback_errors == 1
    assert sink.events
    text = "\n".join(
        [
            orjson.dumps({"type": e.type, "source": e.source, "ts": e.ts, "data": e.data}).decode()
            for e in sink.events
        ]
        + [r.getMessage() for r in caplog.records]
        + [repr(r) for r in health.reports]
    ).lower()
    addresses = {r.address for r in records}
    assert len(addresses) > 30
    for address in addresses:
        for form in (address, address.replace(":", ""), address.replace(":", "-"), address.replace(":", "_")):
            assert form.lower() not in text


def test_scrub_hides_addresses_in_any_spelling() -> None:
    text = "dev /org/bluez/hci0/dev_5A_1B_2C_3D_4E_5F and 5a:1b:2c:3d:4e:5f and 5A-1B-2C-3D-4E-5F"
    assert "1B" not in scrub(text) and "1b" not in scrub(text)
    assert scrub("adapter 'hci0' not found") == "adapter 'hci0' not found"


def test_callback_never_raises_into_bleak() -> None:
    driver, _, _, _ = make_driver()
    device = BLEDevice("5A:1B:2C:3D:4E:5F", None, None)
    broken = AdvertisementData(None, None, None, [], None, -60, ())  # type: ignore[arg-type]
    driver.on_advertisement(device, broken)
    driver.on_advertisement(device, None)  # type: ignore[arg-type]
    assert driver.callback_errors == 2


def test_adverts_without_bluez_platform_data_count_for_the_configured_adapter() -> None:
    driver, sink, _, clock = make_driver(demo_config(min_count=1))
    adv = AdvertisementData(None, {}, {}, [], None, -70, ())
    driver.on_advertisement(BLEDevice("5A:1B:2C:3D:4E:5F", None, None), adv)
    clock.now = T0 + 60
    driver.presence.tick(clock.now)
    assert [e.data["entered"] for e in sink.events if e.data["zone"] == "shop"] == [1]
    assert driver.callback_errors == 0


# --- replay ---------------------------------------------------------------------------------------


def test_bleak_objects_look_like_the_bluez_backend_made_them() -> None:
    record = TraceRecord(1.0, "5A:1B:2C:3D:4E:5F", -61, {76: b"\x10\x05\x01"}, {}, None, "hci1")
    device, adv = bleak_objects(record)
    assert isinstance(device, BLEDevice) and isinstance(adv, AdvertisementData)
    assert (device.address, device.name, adv.rssi, adv.manufacturer_data) == (
        "5A:1B:2C:3D:4E:5F",
        None,
        -61,
        {76: b"\x10\x05\x01"},
    )
    path, props = adv.platform_data
    assert path == "/org/bluez/hci1/dev_5A_1B_2C_3D_4E_5F" and props["Adapter"] == "/org/bluez/hci1"
    assert device.details == {"path": path, "props": props}
    same, _ = bleak_objects(record, device)
    assert same is device


def test_trace_errors_name_the_file_and_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    good = {"t": 0, "address": "5A:00:00:00:00:01", "rssi": -60, "manufacturer_data": {}, "service_data": {}}
    trace.write_text(json.dumps(good) + "\n" + json.dumps({**good, "manufacturer_data": {"76": "zz"}}) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl, line 2: .*hex"):
        load_trace(trace)
    with pytest.raises(TraceError, match="missing.jsonl"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError):  # a bad replay file is bad config: the driver is not built
        BleDriver(demo_config(replay=str(trace)), RecordingSink(), RecordingHealth())


def test_replay_plays_every_record_in_order_and_loops() -> None:
    records = load_trace(demo_trace("ble_staff.jsonl"))[:50]
    seen: list[tuple[str, int]] = []

    async def main() -> int:
        once = BleReplay(records, speed=1e6, loop=False)
        await once.run(lambda d, a: seen.append((d.address, a.rssi)))
        looping = BleReplay(records, speed=1e6, loop=True)
        task = asyncio.create_task(looping.run(lambda d, a: None))
        assert await wait_until_async(lambda: looping.passes >= 3, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return looping.played

    played = asyncio.run(main())
    assert seen == [(r.address, r.rssi) for r in records]
    assert played >= 3 * len(records)


def test_replay_keeps_the_recorded_pace() -> None:
    records = [TraceRecord(t, "5A:00:00:00:00:01", -60, {}, {}) for t in (0.0, 2.0, 5.0)]
    fake_now = [100.0]
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        fake_now[0] += seconds

    replay = BleReplay(records, speed=2.0, loop=False, clock=lambda: fake_now[0], sleep=fake_sleep)
    asyncio.run(replay.run(lambda d, a: None))
    assert [w for w in waits if w > 0] == [1.0, 1.5]


def test_driver_in_replay_mode_needs_no_radio() -> None:
    cfg = demo_config(
        replay="ble_staff.jsonl", replay_speed=1000.0, replay_loop=False
    )  # a bare name: the demo trace
    driver, sink, health, _ = make_driver(cfg, clock=time.time, scanner_factory=_refuse_factory)

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: len(sink.of("presence.arrive")) >= 5, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert ("ble", "replay", True, None) in health.reports


def _refuse_factory(adapter: str, mode: str, callback) -> object:
    raise AssertionError("a replaying driver must not open a scanner")


# --- scanners: watchdog, fallback, missing adapter -----------------------------------------------


class FakeScanner:
    """Reports `adverts` advertisements on start, then goes silent (a scanner BlueZ forgot)."""

    def __init__(
        self, adapter: str, mode: str, callback, adverts: int = 3, fail: BaseException | None = None
    ) -> None:
        self.adapter, self.mode, self.callback = adapter, mode, callback
        self.adverts, self.fail = adverts, fail
        self.started = self.stopped = False

    async def start(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.started = True
        for i in range(self.adverts):
            record = TraceRecord(0.0, f"5A:00:00:00:00:{i:02X}", -70, {}, {}, None, self.adapter)
            self.callback(*bleak_objects(record))

    async def stop(self) -> None:
        self.stopped = True


def test_watchdog_restarts_a_scanner_that_went_silent() -> None:
    made: list[FakeScanner] = []

    def factory(adapter: str, mode: str, callback) -> FakeScanner:
        made.append(FakeScanner(adapter, mode, callback))
        return made[-1]

    driver, _, health, _ = make_driver(
        demo_config(watchdog_s=0.2, scanning_mode="active", zones=[]), scanner_factory=factory
    )

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: len(made) >= 3, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert all(s.started for s in made) and all(s.stopped for s in made)
    assert driver.restarts >= 2 and driver.adverts >= 6
    assert {m.mode for m in made} == {"active"}
    assert health.of("hci0")[0] == ("ble", "hci0", True, None)


def test_auto_mode_falls_back_to_active_when_passive_is_not_supported() -> None:
    made: list[FakeScanner] = []

    def factory(adapter: str, mode: str, callback) -> FakeScanner:
        fail = (
            BleakError("passive scanning on Linux requires BlueZ >= 5.56 with --experimental enabled")
            if mode == "passive"
            else None
        )
        made.append(FakeScanner(adapter, mode, callback, adverts=1000, fail=fail))
        return made[-1]

    driver, _, health, _ = make_driver(demo_config(scanning_mode="auto", zones=[]), scanner_factory=factory)

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: driver.modes.get("hci0") == "active", 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [m.mode for m in made] == ["passive", "active"]
    assert health.of("hci0") == [("ble", "hci0", True, None)]


def test_auto_mode_prefers_passive_where_it_works() -> None:
    made: list[FakeScanner] = []

    def factory(adapter: str, mode: str, callback) -> FakeScanner:
        made.append(FakeScanner(adapter, mode, callback, adverts=10))
        return made[-1]

    driver, _, _, _ = make_driver(demo_config(scanning_mode="auto", zones=[]), scanner_factory=factory)

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: "hci0" in driver.modes, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert driver.modes == {"hci0": "passive"} and made[0].stopped


def test_powered_off_adapter_is_reported_and_retried() -> None:
    attempts: list[str] = []

    def factory(adapter: str, mode: str, callback) -> FakeScanner:
        attempts.append(mode)
        off = BleakBluetoothNotAvailableError(
            "No powered Bluetooth adapters found.", BleakBluetoothNotAvailableReason.POWERED_OFF
        )
        return FakeScanner(adapter, mode, callback, fail=off if len(attempts) < 3 else None)

    driver, _, health, _ = make_driver(
        demo_config(scanning_mode="active", zones=[]),
        scanner_factory=factory,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: any(r[2] for r in health.of("hci0")), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    downs = [r for r in health.of("hci0") if not r[2]]
    assert len(downs) == 2 and "powered_off" in downs[0][3]
    assert health.of("hci0")[-1] == ("ble", "hci0", True, None)


@pytest.mark.parametrize("mode", ["passive", "active", "auto"])
def test_no_bluez_on_this_machine_is_reported_and_retried_with_real_bleak(mode: str) -> None:
    # The real BleakScanner: there is no D-Bus system bus here, so starting it fails.
    cfg = demo_config(scanning_mode=mode, zones=[{"name": "aisle", "adapter": "hci1"}])
    driver, _, health, _ = make_driver(
        cfg, scanner_factory=bleak_scanner, backoff_initial_s=0.01, backoff_max_s=0.05
    )

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: len(health.of("hci0")) >= 3 and len(health.of("hci1")) >= 3, 10)
        assert not task.done()  # still retrying, not crashed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for kind, name, up, error in health.reports:
        assert (kind, up) == ("ble", False) and name in ("hci0", "hci1")
        assert error and "bluez" in error.lower()


def test_describe_says_why_in_one_line() -> None:
    assert "D-Bus" in describe(FileNotFoundError(2, "No such file or directory"))
    off = BleakBluetoothNotAvailableError(
        "No powered Bluetooth adapters found.", BleakBluetoothNotAvailableReason.POWERED_OFF
    )
    assert describe(off).endswith("(powered_off)")
    assert describe(BleakError("adapter 'hci3' not found")) == "BleakError: adapter 'hci3' not found"


def test_the_passive_bleak_scanner_is_built_with_advertisement_monitor_patterns() -> None:
    # bleak refuses passive scanning without BlueZ or_patterns at construction time.
    scanner = bleak_scanner("hci0", "passive", lambda d, a: None)
    assert callable(scanner.start) and callable(scanner.stop)
    assert callable(bleak_scanner("hci1", "active", lambda d, a: None).start)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "t": json_values,
            "address": json_values,
            "rssi": json_values,
            "manufacturer_data": json_values | st.dictionaries(st.text(max_size=3), st.text(max_size=6)),
            "service_data": json_values | st.dictionaries(st.text(max_size=3), st.text(max_size=6)),
            "local_name": json_values,
            "adapter": json_values,
        },
    )
    | json_values
)
def test_trace_records_are_parsed_or_refused_with_value_error(obj) -> None:
    try:
        record = parse_record(obj)
    except ValueError:
        return
    assert isinstance(record, TraceRecord)
    bleak_objects(record)


@pytest.mark.parametrize("t", [10**400, float("inf"), float("nan"), -1, True, "0"])
def test_trace_times_must_be_finite_seconds(t) -> None:
    with pytest.raises(ValueError, match="t must be"):
        parse_record({"t": t, "address": "5A:00:00:00:00:01", "rssi": -60})


def test_demo_trace_paths_resolve_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_trace(Path("agent/demo/ble_door.jsonl")) == demo_trace("ble_door.jsonl")
    assert resolve_trace(Path("ble_staff.jsonl")) == demo_trace("ble_staff.jsonl")
    mine = tmp_path / "ble_door.jsonl"
    mine.write_text("")
    assert resolve_trace(Path("ble_door.jsonl")) == Path("ble_door.jsonl")  # a file here wins
