"""BLE advertising data and beacon frames (contract section 6), agent/protocols/ble.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocols.ble import (
    BleParseError,
    decode_ble_hex,
    frames_from_ad,
    frames_from_bleak,
    parse_ad,
)

EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"


def bleak_view(ad: bytes) -> tuple[dict[int, bytes], dict[str, bytes]]:
    """What bleak's AdvertisementData would hold for these AD structures."""
    manufacturer: dict[int, bytes] = {}
    service: dict[str, bytes] = {}
    for ad_type, data in parse_ad(ad):
        if ad_type == 0xFF:
            manufacturer[int.from_bytes(data[:2], "little")] = data[2:]
        elif ad_type == 0x16:
            service[f"0000{int.from_bytes(data[:2], 'little'):04x}-0000-1000-8000-00805f9b34fb"] = data[2:]
    return manufacturer, service


def both_paths(ad: bytes) -> list[dict]:
    """Decode through raw AD and through the bleak view; they must agree."""
    frames = frames_from_ad(ad)
    assert frames_from_bleak(*bleak_view(ad)) == frames
    return frames


# --- AD walker ---------------------------------------------------------------------------


def test_ad_structures_split_and_padding_ends_them():
    ad = bytes.fromhex("020106 03 03aafe 00 ffffff")  # flags, UUID list, then zero padding
    assert parse_ad(ad) == [(0x01, b"\x06"), (0x03, b"\xaa\xfe")]


def test_ad_structure_running_past_the_end_is_an_error():
    with pytest.raises(BleParseError, match="byte 3"):
        parse_ad(bytes.fromhex("020106 1aff4c00"))


def test_extended_advertising_longer_than_31_bytes_is_accepted():
    ibeacon = bytes.fromhex("1aff4c000215" + "11" * 16 + "00010002c5")
    url = bytes.fromhex("0e16aafe10f803") + b"example" + b"\x07"
    ad = bytes.fromhex("020106") + ibeacon + url
    assert len(ad) > 31
    assert [f["format"] for f in both_paths(ad)] == ["ibeacon", "eddystone_url"]


# --- iBeacon -----------------------------------------------------------------------------


def test_ibeacon_published_example():
    # Source: github.com/forforf/multi_beacon ibeacon_protocol.md, "Complete data" (UUID
    # 83256B74-78D043A4-826905F9-DC8A44BA, major 16, minor 32, measured power -58 = 0xC6).
    ad = bytes.fromhex("02011A1AFF4C000215 83256B7478D043A4826905F9DC8A44BA 0010 0020 C6")
    assert both_paths(ad) == [
        {
            "format": "ibeacon",
            "uuid": "83256b74-78d0-43a4-8269-05f9dc8a44ba",
            "major": 16,
            "minor": 32,
            "tx_power": -58,
        }
    ]


def test_ibeacon_from_beacontools_capture():
    # Source: github.com/citruz/beacontools tests/test_parser.py test_ibeacon.
    ad = b"\x02\x01\x06\x1a\xff\x4c\x00\x02\x15ABCDEFGHI@ABCDEF\x00\x01\x00\x02\xf8"
    (frame,) = both_paths(ad)
    assert frame["uuid"] == "41424344-4546-4748-4940-414243444546"
    assert (frame["major"], frame["minor"], frame["tx_power"]) == (1, 2, -8)


def test_ibeacon_major_minor_are_big_endian():
    ad = bytes.fromhex("1aff4c000215" + "00" * 16 + "1234" + "abcd" + "7f")
    (frame,) = frames_from_ad(ad)
    assert (frame["major"], frame["minor"], frame["tx_power"]) == (0x1234, 0xABCD, 127)


@pytest.mark.parametrize("extra", [b"", b"\x00\x00"])
def test_ibeacon_of_wrong_length_is_malformed(extra):
    body = bytes.fromhex("4c000215" + "00" * 16 + "00010002") + extra  # power byte missing, or 1 too many
    ad = bytes([len(body) + 1, 0xFF]) + body
    with pytest.raises(BleParseError, match="iBeacon"):
        frames_from_ad(ad)


def test_other_apple_data_is_not_a_frame():
    # Apple "Nearby Info" (type 0x10) as iPhones send it: not a beacon.
    assert frames_from_ad(bytes.fromhex("0bff4c001006071e8b3a0d19")) == []


# --- AltBeacon ---------------------------------------------------------------------------


def test_altbeacon_reference_transmit_script():
    # Source: github.com/RadiusNetworks/altbeacon-reference altbeacon_transmit: company 0x0118
    # (little-endian "18 01"), ID1 16 zero bytes, ID2 00 01, ID3 00 01, ref RSSI c5, reserved 01.
    ad = bytes.fromhex("02011a 1bff1801beac" + "00" * 16 + "0001" + "0001" + "c5" + "01")
    assert both_paths(ad) == [
        {
            "format": "altbeacon",
            "beacon_id": "00" * 16 + "00010001",
            "manufacturer_id": 0x0118,
            "reference_rssi": -59,
            "mfg_reserved": 1,
        }
    ]


def test_altbeacon_of_wrong_length_is_malformed():
    ad = bytes.fromhex("1aff1801beac" + "00" * 20 + "c5")  # reserved byte missing
    with pytest.raises(BleParseError, match="AltBeacon"):
        frames_from_ad(ad)


# --- Eddystone ---------------------------------------------------------------------------


def test_eddystone_uid_with_rfu_bytes():
    # Source: github.com/citruz/beacontools tests/test_parser.py test_eddystone_uid.
    ad = (
        b"\x02\x01\x06\x03\x03\xaa\xfe\x17\x16\xaa\xfe\x00\xe3\x12\x34\x56\x78\x90"
        b"\x12\x34\x67\x89\x01\x00\x00\x00\x00\x00\x01\x00\x00"
    )
    assert both_paths(ad) == [
        {
            "format": "eddystone_uid",
            "namespace": "12345678901234678901",
            "instance": "000000000001",
            "tx_power": -29,
        }
    ]


def test_eddystone_uid_without_rfu_bytes_is_accepted():
    # The UID spec (github.com/google/eddystone eddystone-uid/README.md, Field Notes) says older
    # beacons truncate the frame to omit the RFU bytes (length 0x15). beacontools used to drop
    # them (citruz/beacontools issue #10) and Google's own iOS sample rejected the long form
    # (google/eddystone issue #39); both lengths are UID frames.
    ad = bytes.fromhex("15 16 aafe 00 ee" + "8b0ca750095477cb3e77" + "0000000000ff")
    assert both_paths(ad)[0]["namespace"] == "8b0ca750095477cb3e77"


@pytest.mark.parametrize("length", [17, 19, 21])
def test_eddystone_uid_of_other_length_is_malformed(length):
    frame = bytes([0x00, 0xEE]) + bytes(length - 2)
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    with pytest.raises(BleParseError, match="UID"):
        frames_from_ad(ad)


def test_eddystone_recognised_by_service_data_without_uuid_list():
    # beacontools' bad-packet example lists UUID 0xFEAB but carries FEAA service data; the
    # contract recognises Eddystone by the service data alone.
    ad = (
        b"\x02\x01\x06\x03\x03\xab\xfe\x17\x16\xaa\xfe\x00\xe3\x12\x34\x56\x78\x90"
        b"\x12\x34\x67\x89\x01\x00\x00\x00\x00\x00\x01\x00\x00"
    )
    assert [f["format"] for f in frames_from_ad(ad)] == ["eddystone_uid"]
    assert [f["format"] for f in frames_from_ad(ad[7:])] == ["eddystone_uid"]  # no list at all


def test_eddystone_url_published_example():
    # Source: github.com/citruz/beacontools tests/test_parser.py test_eddystone_url.
    ad = b"\x03\x03\xaa\xfe\x13\x16\xaa\xfe\x10\xf8\x03github\x00citruz"
    assert both_paths(ad) == [{"format": "eddystone_url", "url": "https://github.com/citruz", "tx_power": -8}]


def test_eddystone_url_spec_tx_power_examples():
    # Source: google/eddystone eddystone-url/README.md: 0x12 is +18 dBm, 0xEE is -18 dBm.
    for byte, dbm in ((0x12, 18), (0xEE, -18)):
        ad = bytes([0x09, 0x16, 0xAA, 0xFE, 0x10, byte, 0x02]) + b"a.b"
        assert frames_from_ad(ad)[0]["tx_power"] == dbm


SCHEMES = ["http://www.", "https://www.", "http://", "https://"]
EXPANSIONS = [".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/"]
EXPANSIONS += [e.rstrip("/") for e in EXPANSIONS]


@pytest.mark.parametrize("scheme", range(4))
@pytest.mark.parametrize("code", range(14))
def test_eddystone_url_every_scheme_and_expansion(scheme, code):
    # Tables from google/eddystone eddystone-url/README.md.
    frame = bytes([0x10, 0x00, scheme]) + b"shop" + bytes([code]) + b"x"
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    assert frames_from_ad(ad)[0]["url"] == SCHEMES[scheme] + "shop" + EXPANSIONS[code] + "x"


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x10, 0x00, 0x04]) + b"a",  # scheme 0x04 reserved
        bytes([0x10, 0x00, 0x03]) + b"a\x0e",  # 0x0e-0x20 reserved
        bytes([0x10, 0x00, 0x03]) + b"a\x7f",  # 0x7f-0xff reserved
        bytes([0x10, 0x00]),  # no scheme byte
        bytes([0x10, 0x00, 0x03]) + b"a" * 18,  # encoded URL longer than 17
    ],
)
def test_eddystone_url_malformed(frame):
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    with pytest.raises(BleParseError, match="URL"):
        frames_from_ad(ad)


def test_eddystone_tlm_capture_uptime_in_tenths_of_seconds():
    # Source: github.com/citruz/beacontools tests/test_parser.py test_eddystone_tlm. Its test
    # expects seconds_since_boot 10948 (0x002ac4e4 / 256); the TLM spec
    # (google/eddystone eddystone-tlm/tlm-plain.md) says SEC_CNT has 0.1 s resolution.
    ad = (
        b"\x02\x01\x06\x03\x03\xaa\xfe\x11\x16\xaa\xfe\x20\x00\x0b\x18\x13\x00\x00"
        b"\x00\x14\x67\x00\x2a\xc4\xe4"
    )
    assert both_paths(ad) == [
        {
            "format": "eddystone_tlm",
            "version": 0,
            "battery_mv": 2840,
            "temperature_c": 19.0,
            "adv_count": 5223,
            "uptime_s": 280291.6,
        }
    ]


@pytest.mark.parametrize(
    ("raw", "celsius"),
    [
        (b"\x17\x80", 23.5),
        (b"\xff\x80", -0.5),  # signed 8.8: citruz/beacontools issue #41 reported 220 °C for -36
        (b"\xdc\x00", -36.0),
        (b"\x80\x00", None),  # tlm-plain.md: 0x8000 = not supported
        (b"\x7f\xff", 127 + 255 / 256),
    ],
)
def test_eddystone_tlm_temperature_is_signed_fixed_point(raw, celsius):
    frame = b"\x20\x00\x0b\xb8" + raw + bytes(8)
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    assert frames_from_ad(ad)[0]["temperature_c"] == celsius


@pytest.mark.parametrize("length", [13, 15, 18])
def test_eddystone_tlm_not_exactly_14_bytes_is_malformed(length):
    frame = b"\x20\x00" + bytes(length - 2)
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    with pytest.raises(BleParseError, match="14 bytes"):
        frames_from_ad(ad)


def test_encrypted_tlm_and_eid_are_not_reported():
    # Sources: beacontools test_eddystone_tlm_enc and test_eddystone_eid captures. The ETLM
    # capture's AD length byte says 0x11 but 21 bytes follow (beacontools never checks it);
    # 0x15 is the length tlm-encrypted.md gives for the 18-byte frame.
    etlm = b"\x02\x01\x06\x03\x03\xaa\xfe\x15\x16\xaa\xfe\x20\x01" + b"A" * 12 + b"\xde\xad\xbe\xff"
    eid = b"\x02\x01\x06\x03\x03\xaa\xfe\x0d\x16\xaa\xfe\x30\xe3EID_test"
    assert both_paths(etlm) == []
    assert both_paths(eid) == []


def test_well_formed_advert_without_beacon_gives_no_frames():
    assert decode_ble_hex("02 01 06 05 09 54 69 6c 6c") == {"frames": []}  # flags + name "Till"
    assert decode_ble_hex("") == {"frames": []}


# --- hex entry point ---------------------------------------------------------------------


def test_decode_hex_accepts_separators_and_prefix():
    text = "0x02:01:06:1a:ff:4c:00:02:15:" + ":".join(["00"] * 16) + ":00:01:00:02:c5"
    assert decode_ble_hex(text)["frames"][0]["format"] == "ibeacon"


@pytest.mark.parametrize("text", ["zz", "0201060", "02 01 06 1"])
def test_decode_hex_rejects_bad_hex(text):
    with pytest.raises(BleParseError):
        decode_ble_hex(text)


# --- properties --------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_ble_parse_error(data):
    try:
        frames = frames_from_ad(data)
    except BleParseError:
        return
    assert isinstance(frames, list)
    assert frames_from_bleak(*bleak_view(data)) == frames


@given(
    st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=40), max_size=4),
    st.dictionaries(st.one_of(st.just(EDDYSTONE), st.uuids().map(str)), st.binary(max_size=30), max_size=3),
)
def test_random_bleak_data_raises_only_ble_parse_error(manufacturer, service):
    try:
        frames_from_bleak(manufacturer, service)
    except BleParseError:
        pass


@given(st.text(max_size=80))
def test_random_hex_text_raises_only_ble_parse_error(text):
    try:
        decode_ble_hex(text)
    except BleParseError:
        pass


@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(-128, 127),
)
def test_ibeacon_fields_round_trip(uuid, major, minor, power):
    body = b"\x4c\x00\x02\x15" + uuid + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
    body += power.to_bytes(1, "big", signed=True)
    (frame,) = both_paths(bytes([len(body) + 1, 0xFF]) + body)
    assert frame["uuid"].replace("-", "") == uuid.hex()
    assert (frame["major"], frame["minor"], frame["tx_power"]) == (major, minor, power)


@given(st.integers(-32768, 32767).filter(lambda v: v != -32768), st.integers(0, 2**32 - 1))
def test_tlm_temperature_and_uptime_round_trip(fixed, tenths):
    frame = b"\x20\x00\x00\x00" + fixed.to_bytes(2, "big", signed=True) + bytes(4) + tenths.to_bytes(4, "big")
    ad = bytes([len(frame) + 3, 0x16, 0xAA, 0xFE]) + frame
    (tlm,) = frames_from_ad(ad)
    assert tlm["temperature_c"] == fixed / 256
    assert tlm["uptime_s"] == tenths / 10


def test_the_typed_dicts_name_exactly_each_frames_keys() -> None:
    import typing

    from agent.protocols import ble

    kinds = {
        typing.get_args(typing.get_type_hints(t)["format"])[0]: t for t in typing.get_args(ble.BeaconFrame)
    }
    hexes = [
        "0201061aff4c000215f7826da64fa24e988024bc5b71e0893e00640003c5",  # iBeacon
        "0303aafe1516aafe00e800010203040506070809aabbccddeeff0000",  # Eddystone-UID
        "0303aafe0e16aafe10e8006578616d706c6507",
    ]  # Eddystone-URL
    seen = set()
    for text in hexes:
        for frame in ble.decode_ble_hex(text)["frames"]:
            assert set(frame) == set(kinds[frame["format"]].__annotations__)
            seen.add(frame["format"])
    assert seen == {"ibeacon", "eddystone_uid", "eddystone_url"}
