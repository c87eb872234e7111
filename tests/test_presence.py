"""BLE presence analytics (agent/core/presence.py) and the [ble] config (agent/presence_config.py).

Everything here is pure: the time is passed in, events are collected from the `emit` callable.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.envelope import Event
from agent.core.presence import (
    DailyKey,
    Presence,
    PresenceParams,
    TagClassifier,
    TagMatch,
    TagMatcher,
    TagRule,
    ZoneParams,
)
from agent.presence_config import BleConfig, BleTagConfig, BleZoneConfig
from agent.protocols.ble import frames_from_bleak

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z, on an interval boundary
STAFF_UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
MEMBER_UUID = "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"
NAMESPACE = "5c3a9f1e7b2d4c6a8e01"
EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"


def ibeacon_md(uuid_text: str, major: int, minor: int) -> dict[int, bytes]:
    return {
        76: b"\x02\x15"
        + uuid.UUID(uuid_text).bytes
        + major.to_bytes(2, "big")
        + minor.to_bytes(2, "big")
        + b"\xc5"
    }


def eddystone_sd(namespace: str, instance: str) -> dict[str, bytes]:
    return {EDDYSTONE: bytes.fromhex("00ec" + namespace + instance + "0000")}


def config(**overrides) -> BleConfig:
    base = {
        "interval_s": 60,
        "min_count": 1,
        "leave_after_s": 30,
        "rssi_smoothing": 1.0,  # no smoothing unless a test asks for it: levels are what is fed
        "zones": [{"name": "door", "min_rssi": -60, "hysteresis_db": 4}, {"name": "shop", "min_rssi": -90}],
        "tags": [
            {"name": "staff", "kind": "staff", "ibeacon_uuid": STAFF_UUID},
            {"name": "boss", "kind": "staff", "ibeacon_uuid": STAFF_UUID, "major": 1, "minor": 1},
            {"name": "basket", "kind": "basket", "eddystone_namespace": NAMESPACE},
            {"name": "member", "kind": "member_app", "ibeacon_uuid": MEMBER_UUID},
        ],
    }
    base.update(overrides)
    return BleConfig.model_validate(base)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def summaries(self, zone: str) -> list[dict]:
        return [dict(e.data) for e in self.events if e.type == "traffic.summary" and e.data["zone"] == zone]


def make(cfg: BleConfig | None = None, *, keys: list[bytes] | None = None, day_offset_s: float = 0.0):
    rec = Recorder()
    supply = iter(keys) if keys is not None else None

    def key_source() -> bytes:
        return next(supply) if supply is not None else b"k" * 32

    params = (cfg or config()).presence_params()
    return Presence(params, rec, key_source=key_source, day_offset_s=day_offset_s), rec


def tag_of(cfg: BleConfig, md=None, sd=None) -> TagMatch | None:
    return TagClassifier(cfg.presence_params().tags, frames_from_bleak).classify(md or {}, sd or {})


# --- config -----------------------------------------------------------------------------------


def test_config_models_forbid_unknown_keys_and_normalise_identifiers() -> None:
    tag = BleTagConfig(name="s", kind="staff", ibeacon_uuid=STAFF_UUID.upper())
    assert tag.ibeacon_uuid == STAFF_UUID
    assert (
        BleTagConfig(name="b", kind="basket", eddystone_namespace=NAMESPACE.upper()).eddystone_namespace
        == NAMESPACE
    )
    with pytest.raises(ValidationError, match="min_rsi"):
        BleZoneConfig.model_validate({"name": "door", "min_rsi": -60})
    with pytest.raises(ValidationError, match="extra"):
        BleConfig.model_validate({"adaptor": "hci1"})


@pytest.mark.parametrize(
    "tag, message",
    [
        ({"name": "t", "kind": "staff"}, "exactly one"),
        (
            {"name": "t", "kind": "staff", "ibeacon_uuid": STAFF_UUID, "eddystone_namespace": NAMESPACE},
            "exactly one",
        ),
        ({"name": "t", "kind": "staff", "eddystone_namespace": NAMESPACE, "major": 1}, "major and minor"),
        ({"name": "t", "kind": "staff", "ibeacon_uuid": STAFF_UUID, "instance": "00" * 6}, "instance goes"),
        ({"name": "t", "kind": "staff", "ibeacon_uuid": "not-a-uuid"}, "UUID"),
        ({"name": "t", "kind": "staff", "eddystone_namespace": "abc"}, "20 hex"),
        ({"name": "t", "kind": "visitor", "ibeacon_uuid": STAFF_UUID}, "kind"),
        ({"name": "t", "kind": "staff", "ibeacon_uuid": STAFF_UUID, "major": 70000}, "major"),
    ],
)
def test_bad_tag_entries_are_errors(tag: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BleConfig.model_validate({"tags": [tag]})


def test_duplicate_names_and_bad_adapters_are_errors() -> None:
    with pytest.raises(ValidationError, match="used twice"):
        BleConfig.model_validate({"zones": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError, match="adapter"):
        BleConfig.model_validate({"adapter": "/org/bluez/hci0"})
    cfg = BleConfig.model_validate(
        {"adapter": "hci0", "zones": [{"name": "a", "adapter": "hci1"}, {"name": "b", "adapter": "hci0"}]}
    )
    assert cfg.adapters() == ["hci0", "hci1"]


# --- tags ---------------------------------------------------------------------------------------


def test_tag_matching_prefers_the_pinned_entry_and_names_family_members_by_ident() -> None:
    cfg = config()
    assert tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1)) == TagMatch(("boss", "00010001"), "boss", "staff", None)
    found = tag_of(cfg, ibeacon_md(STAFF_UUID, 100, 7))
    assert (found.tag, found.kind, found.token) == ("staff:00640007", "staff", None)
    basket = tag_of(cfg, sd=eddystone_sd(NAMESPACE, "00000000b001"))
    assert (basket.tag, basket.kind) == ("basket:00000000b001", "basket")


def test_member_app_token_is_the_ident_and_the_tag_is_the_configured_name() -> None:
    found = tag_of(config(), ibeacon_md(MEMBER_UUID, 0x1234, 0xABCD))
    assert (found.tag, found.kind, found.token) == ("member", "member_app", "1234abcd")


def test_unconfigured_beacons_and_phones_are_anonymous() -> None:
    cfg = config()
    assert tag_of(cfg, ibeacon_md(str(uuid.UUID(int=7)), 1, 1)) is None
    assert tag_of(cfg, sd=eddystone_sd("00" * 10, "00" * 6)) is None
    assert tag_of(cfg, {76: bytes.fromhex("1005031c5a3f4e")}) is None  # Apple Nearby Info
    assert tag_of(cfg, {6: bytes(26)}) is None


def test_eddystone_instance_pin() -> None:
    matcher = TagMatcher(
        [
            BleTagConfig(
                name="cart-7", kind="basket", eddystone_namespace=NAMESPACE, instance="0000000000b7"
            ).rule(),
            BleTagConfig(name="cart", kind="basket", eddystone_namespace=NAMESPACE).rule(),
        ]
    )
    frame = {"format": "eddystone_uid", "namespace": NAMESPACE, "instance": "0000000000b7", "tx_power": -20}
    assert matcher.match([frame]).tag == "cart-7"
    assert matcher.match([{**frame, "instance": "0000000000b8"}]).tag == "cart:0000000000b8"


def test_classifier_parses_a_payload_once_and_survives_malformed_ones() -> None:
    classifier = TagClassifier(config().presence_params().tags, frames_from_bleak)
    bad = {76: b"\x02\x15" + bytes(10)}  # an iBeacon frame cut short: the parser's error
    for _ in range(5):
        assert classifier.classify(bad, {}) is None
    assert classifier.parse_errors == 1  # cached after the first time
    first = classifier.classify(ibeacon_md(STAFF_UUID, 100, 2), {})
    assert classifier.classify(ibeacon_md(STAFF_UUID, 100, 2), {}) is first


def test_no_tags_configured_means_nothing_is_a_tag() -> None:
    assert TagClassifier([], frames_from_bleak).classify(ibeacon_md(STAFF_UUID, 1, 1), {}) is None


# --- the counting key -----------------------------------------------------------------------------


def test_daily_key_is_hmac_sha256_of_the_address() -> None:
    key = bytes(range(32))
    daily = DailyKey(lambda: key)
    address = "5A:1B:2C:3D:4E:5F"
    assert daily.digest(address, T0) == hmac.digest(key, address.encode(), hashlib.sha256)


def test_daily_key_is_replaced_at_the_day_boundary_and_only_then() -> None:
    keys = [bytes([i]) * 32 for i in range(1, 4)]
    supplied: list[bytes] = []

    def source() -> bytes:
        supplied.append(keys[len(supplied)])
        return supplied[-1]

    # Boundary at local midnight of UTC+8: 16:00 UTC.
    daily = DailyKey(source, day_offset_s=8 * 3600)
    midnight = 1_800_028_800.0  # 2027-01-15T16:00:00Z
    assert (midnight + 8 * 3600) % 86400 == 0
    before = daily.digest("5A:00:00:00:00:01", midnight - 1)
    assert daily.digest("5A:00:00:00:00:01", midnight - 3600) == before
    after = daily.digest("5A:00:00:00:00:01", midnight)
    assert after != before
    assert after == hmac.digest(keys[1], b"5A:00:00:00:00:01", hashlib.sha256)
    assert daily.digest("5A:00:00:00:00:01", midnight + 86399) == after
    assert len(supplied) == 2
    daily.digest("5A:00:00:00:00:01", midnight + 86400)
    assert len(supplied) == 3


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        DailyKey(lambda: b"short").digest("5A:00:00:00:00:01", T0)


# --- zones ----------------------------------------------------------------------------------------


def test_rssi_thresholds_with_hysteresis() -> None:
    cfg = config()
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    zones = []
    for i, level in enumerate([-80, -59, -62, -63, -65, -58, -95]):
        presence.observe("C0:00:00:00:00:01", level, badge, "hci0", T0 + i)
        zones.append([e.data["zone"] for e in rec.events][-1:])
    # -62 and -63 stay at the door (within 4 dB of -60); -65 leaves it; -95 is in no zone.
    assert [z[0] for z in zones] == ["shop", "door", "door", "door", "shop", "door", "door"]
    assert [e.type for e in rec.events] == [
        "presence.arrive",
        "presence.zone",
        "presence.zone",
        "presence.zone",
    ]


def test_receiver_zones_take_the_receiver_that_hears_best_with_hysteresis() -> None:
    cfg = config(
        zones=[
            {"name": "front", "adapter": "hci0", "hysteresis_db": 3},
            {"name": "aisle", "adapter": "hci1", "hysteresis_db": 3},
        ]
    )
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    steps = [("hci0", -60), ("hci1", -70), ("hci1", -58), ("hci1", -62), ("hci0", -61), ("hci0", -66)]
    for i, (adapter, level) in enumerate(steps):
        presence.observe("C0:00:00:00:00:01", level, badge, adapter, T0 + i)
    moves = [(e.type, e.data["zone"]) for e in rec.events]
    # hci1 at -58 beats hci0's -60 by 2 dB: within front's 3 dB hysteresis, so it stays front;
    # hci1 -62 vs hci0 -61: still front; hci0 -66 vs hci1 -62: 4 dB worse, so the aisle.
    assert moves == [("presence.arrive", "front"), ("presence.zone", "aisle")]


def test_a_receiver_that_lost_the_device_has_no_say() -> None:
    cfg = config(zones=[{"name": "front", "adapter": "hci0"}, {"name": "aisle", "adapter": "hci1"}])
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    presence.observe("C0:00:00:00:00:01", -50, badge, "hci0", T0)
    presence.observe("C0:00:00:00:00:01", -80, badge, "hci1", T0 + 10)  # hci0's -50 is still fresh
    presence.observe("C0:00:00:00:00:01", -80, badge, "hci1", T0 + 31)  # hci0 has not heard it for 31 s
    assert [e.data["zone"] for e in rec.events] == ["front", "aisle"]


def test_rssi_is_smoothed_per_receiver() -> None:
    cfg = config(
        rssi_smoothing=0.5, zones=[{"name": "near", "min_rssi": -55, "hysteresis_db": 0}, {"name": "far"}]
    )
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    for i, level in enumerate([-70, -40, -40]):  # smoothed: -70, -55, -47.5
        presence.observe("C0:00:00:00:00:01", level, badge, "hci0", T0 + i)
    assert [(e.data["zone"], e.ts) for e in rec.events] == [
        ("far", "2027-01-15T08:00:00.000Z"),
        ("near", "2027-01-15T08:00:01.000Z"),
    ]


def test_no_zones_configured_means_one_zone_for_everything() -> None:
    presence, rec = make(config(zones=[]))
    presence.observe("5A:00:00:00:00:01", -99, None, "hci0", T0 + 1)
    presence.tick(T0 + 60)
    assert presence.zone_names == ["store"]
    assert rec.summaries("store")[0]["entered"] == 1


# --- tag events -----------------------------------------------------------------------------------


def test_tag_arrive_zone_leave_with_dwell() -> None:
    cfg = config()
    presence, rec = make(cfg)
    member = tag_of(cfg, ibeacon_md(MEMBER_UUID, 0x0102, 0x0304))
    presence.observe("5A:00:00:00:00:09", -70, member, "hci0", T0 + 1)
    presence.observe("5A:00:00:00:00:09", -50, member, "hci0", T0 + 11)
    presence.observe("5A:00:00:00:00:09", -52, member, "hci0", T0 + 40)
    presence.tick(T0 + 69.9)  # 29.9 s after the last sighting: still there
    assert not rec.of("presence.leave")
    presence.tick(T0 + 70)
    arrive, zone = rec.of("presence.arrive")[0], rec.of("presence.zone")[0]
    leave = rec.of("presence.leave")[0]
    assert dict(arrive.data) == {
        "tag": "member",
        "kind": "member_app",
        "token": "01020304",
        "zone": "shop",
        "dwell_s": 0.0,
    }
    assert dict(zone.data) == {
        "tag": "member",
        "kind": "member_app",
        "token": "01020304",
        "zone": "door",
        "from": "shop",
        "dwell_s": 10.0,
    }
    assert dict(leave.data) == {
        "tag": "member",
        "kind": "member_app",
        "token": "01020304",
        "zone": "door",
        "dwell_s": 39.0,
    }
    assert leave.ts == "2027-01-15T08:00:40.000Z"  # when it was last seen, not when the timeout ran
    assert {e.source for e in rec.events} == {"ble:hci0"}
    assert presence.tracked() == (0, 0)


def test_staff_events_carry_no_token() -> None:
    cfg = config()
    presence, rec = make(cfg)
    presence.observe("C0:00:00:00:00:01", -70, tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1)), "hci0", T0)
    assert dict(rec.events[0].data) == {"tag": "boss", "kind": "staff", "zone": "shop", "dwell_s": 0.0}


def test_a_visit_that_timed_out_before_a_tick_starts_again() -> None:
    cfg = config()
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    presence.observe("C0:00:00:00:00:01", -70, badge, "hci0", T0 + 1)
    presence.observe("C0:00:00:00:00:01", -70, badge, "hci0", T0 + 45)  # no tick in between
    assert [e.type for e in rec.events] == ["presence.arrive", "presence.leave", "presence.arrive"]


def test_tags_are_not_counted_as_traffic() -> None:
    cfg = config()
    presence, rec = make(cfg)
    presence.observe("C0:00:00:00:00:01", -70, tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1)), "hci0", T0 + 1)
    presence.tick(T0 + 60)
    assert rec.summaries("shop")[0]["entered"] == 0


def test_a_tag_heard_only_out_of_every_zone_never_arrives_and_is_forgotten() -> None:
    cfg = config()
    presence, rec = make(cfg)
    badge = tag_of(cfg, ibeacon_md(STAFF_UUID, 1, 1))
    presence.observe("C0:00:00:00:00:01", -99, badge, "hci0", T0 + 1)
    presence.tick(T0 + 40)
    assert rec.events == [] and presence.tracked() == (0, 0)


# --- anonymous traffic ----------------------------------------------------------------------------


def test_traffic_summary_counts_and_median_dwell() -> None:
    presence, rec = make(config(min_count=1))
    # Three phones: two stay in the shop, one goes door -> shop and leaves.
    for second in range(0, 50, 5):
        presence.observe("5A:00:00:00:00:01", -70, None, "hci0", T0 + second)
        presence.observe("5A:00:00:00:00:02", -75, None, "hci0", T0 + second + 1)
    presence.observe("5A:00:00:00:00:03", -55, None, "hci0", T0 + 2)
    presence.observe("5A:00:00:00:00:03", -80, None, "hci0", T0 + 12)  # door 10 s, then the shop
    presence.tick(T0 + 30)
    presence.tick(T0 + 59)
    presence.tick(T0 + 60)
    door, shop = rec.summaries("door")[0], rec.summaries("shop")[0]
    assert door == {
        "zone": "door", "interval_s": 60, "start": "2027-01-15T08:00:00.000Z", "end": "2027-01-15T08:01:00.000Z",
        "present": 0, "entered": 1, "left": 1, "median_dwell_s": 10.0, "suppressed": [],
    }  # fmt: skip
    # Phone 3 was last placed in the shop at +12 and timed out at +42: it entered and left.
    assert (shop["present"], shop["entered"], shop["left"], shop["median_dwell_s"]) == (2, 3, 1, 0.0)
    assert rec.events[0].ts == "2027-01-15T08:01:00.000Z"


def test_the_first_interval_starts_when_counting_starts() -> None:
    presence, rec = make()
    presence.tick(T0 + 17.25)
    presence.tick(T0 + 60)
    summary = rec.summaries("shop")[0]
    assert (summary["start"], summary["end"]) == ("2027-01-15T08:00:17.250Z", "2027-01-15T08:01:00.000Z")
    presence.tick(T0 + 120)
    assert rec.summaries("shop")[1]["start"] == "2027-01-15T08:01:00.000Z"


def test_small_counts_are_suppressed_and_zero_is_not() -> None:
    presence, rec = make(config(min_count=3))
    for i in range(2):
        presence.observe(f"5A:00:00:00:00:0{i}", -70, None, "hci0", T0 + 45)
    for i in range(4):
        presence.observe(f"5A:00:00:00:01:0{i}", -55, None, "hci0", T0 + 45)
    presence.tick(T0 + 60)
    shop, door = rec.summaries("shop")[0], rec.summaries("door")[0]
    assert (shop["present"], shop["entered"], shop["left"]) == (None, None, 0)
    assert shop["suppressed"] == ["present", "entered"]
    assert (door["present"], door["entered"], door["suppressed"]) == (4, 4, [])


def test_median_dwell_is_suppressed_below_min_count_leaves() -> None:
    presence, rec = make(config(min_count=3))
    for i in range(3):
        presence.observe(f"5A:00:00:00:00:0{i}", -70, None, "hci0", T0 + 1)
    presence.observe("5A:00:00:00:00:00", -70, None, "hci0", T0 + 5)
    presence.tick(T0 + 59)  # all three timed out: 3 left, median of (4, 0, 0) s
    presence.tick(T0 + 60)
    assert rec.summaries("shop")[0]["median_dwell_s"] == 0.0
    presence, rec = make(config(min_count=3))
    for i in range(2):
        presence.observe(f"5A:00:00:00:00:0{i}", -70, None, "hci0", T0 + 1)
    presence.tick(T0 + 60)
    summary = rec.summaries("shop")[0]
    assert summary["median_dwell_s"] is None and "median_dwell_s" in summary["suppressed"]


def test_leaves_are_counted_in_the_interval_their_timeout_falls_in() -> None:
    presence, rec = make()
    presence.observe("5A:00:00:00:00:01", -70, None, "hci0", T0 + 50)  # times out at +80
    presence.tick(T0 + 200)  # one late tick closes three intervals
    left = [s["left"] for s in rec.summaries("shop")]
    present = [s["present"] for s in rec.summaries("shop")]
    assert left == [0, 1, 0] and present == [1, 0, 0]


def test_an_address_rotation_counts_as_one_leave_and_one_enter() -> None:
    presence, rec = make()
    for second in range(0, 20, 2):
        presence.observe("5A:00:00:00:00:01", -70, None, "hci0", T0 + second)
    for second in range(20, 58, 2):
        presence.observe("6B:00:00:00:00:02", -70, None, "hci0", T0 + second)  # the same phone, new address
    presence.tick(T0 + 60)
    summary = rec.summaries("shop")[0]
    assert (summary["entered"], summary["left"], summary["present"]) == (2, 1, 1)


def test_at_the_day_boundary_the_same_address_becomes_another_device() -> None:
    boundary = T0 + 120  # day_offset chosen so that the day ends at T0 + 120
    offset = 86400 - (boundary % 86400)
    presence, rec = make(config(leave_after_s=30), keys=[b"a" * 32, b"b" * 32], day_offset_s=offset)
    for second in range(60, 180, 5):
        presence.observe("5A:00:00:00:00:01", -70, None, "hci0", T0 + second)
        presence.tick(T0 + second)
    presence.tick(T0 + 180)
    shop = rec.summaries("shop")
    assert [(s["entered"], s["left"], s["present"]) for s in shop] == [(1, 0, 1), (1, 1, 1)]


def test_address_never_appears_in_events() -> None:
    presence, rec = make(config(min_count=1))
    addresses = [f"5A:1B:2C:3D:4E:{i:02X}" for i in range(20)]
    for second in range(0, 200, 3):
        for i, address in enumerate(addresses):
            presence.observe(address, -50 - i * 2, None, "hci0", T0 + second + i / 100)
        presence.tick(T0 + second)
    presence.tick(T0 + 400)
    assert rec.of("traffic.summary")
    text = (
        b"\n".join(orjson.dumps({"type": e.type, "data": e.data, "ts": e.ts}) for e in rec.events)
        .decode()
        .lower()
    )
    for address in addresses:
        for form in (address, address.replace(":", ""), address.replace(":", "-"), address.replace(":", "_")):
            assert form.lower() not in text


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 7),  # which device
            st.integers(-100, -30),  # rssi
            st.sampled_from(["hci0", "hci1"]),
            st.floats(0, 20),  # seconds since the previous report
        ),
        max_size=120,
    )
)
def test_present_is_previous_present_plus_entered_minus_left(reports) -> None:
    cfg = config(
        zones=[
            {"name": "door", "adapter": "hci0", "min_rssi": -60},
            {"name": "aisle", "adapter": "hci1"},
            {"name": "shop", "min_rssi": -90},
        ]
    )
    presence, rec = make(cfg)
    now = T0
    for device, level, adapter, gap in reports:
        now += gap
        presence.observe(f"5A:00:00:00:00:{device:02X}", level, None, adapter, now)
        if device % 3 == 0:
            presence.tick(now)
    presence.tick(now + 200)
    for zone in presence.zone_names:
        previous = 0
        for summary in rec.summaries(zone):
            assert summary["suppressed"] == []
            assert summary["present"] == previous + summary["entered"] - summary["left"]
            assert summary["present"] >= 0
            previous = summary["present"]
        assert previous == 0  # everyone has timed out by the end
    assert presence.tracked() == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([76, 6, 117, 0xFFFF]), st.binary(max_size=30), max_size=2),
    st.dictionaries(
        st.sampled_from([EDDYSTONE, "0000fe2c-0000-1000-8000-00805f9b34fb"]), st.binary(max_size=24)
    ),
)
def test_classifier_takes_any_bytes(md: dict[int, bytes], sd: dict[str, bytes]) -> None:
    found = TagClassifier(config().presence_params().tags, frames_from_bleak).classify(md, sd)
    assert found is None or isinstance(found, TagMatch)


def test_presence_params_carry_the_ble_section() -> None:
    cfg = BleConfig.model_validate(
        {
            "adapter": "hci1",
            "interval_s": 30,
            "min_count": 4,
            "leave_after_s": 12.5,
            "rssi_smoothing": 0.5,
            "zones": [{"name": "door", "adapter": "hci2", "min_rssi": -60, "hysteresis_db": 3}],
            "tags": [
                {"name": "staff", "kind": "staff", "ibeacon_uuid": STAFF_UUID.upper(), "major": 1, "minor": 2}
            ],
        }
    )
    assert cfg.presence_params() == PresenceParams(
        adapter="hci1",
        interval_s=30.0,
        min_count=4,
        leave_after_s=12.5,
        rssi_smoothing=0.5,
        zones=(ZoneParams("door", "hci2", -60, 3.0),),
        tags=(TagRule("staff", "staff", STAFF_UUID, 1, 2, None, None),),
    )
    assert cfg.presence_params().tags[0].pinned is True
