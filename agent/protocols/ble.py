"""BLE advertising data: AD structures and the beacon frames of contract section 6.

Pure functions over bytes. Two entry points reach the same frame decoders:
`frames_from_ad` walks raw advertising data (what `decode ble HEX` gets), and `frames_from_bleak`
takes what bleak's AdvertisementData already split out (manufacturer data keyed by company id,
service data keyed by 128-bit UUID string).

Specifications followed (they win over what libraries do):
- iBeacon: Apple company 0x004C, then type 0x02, length 0x15, 16-byte UUID, major and minor
  big-endian, signed 8-bit measured power.
- AltBeacon v1.0 (github.com/AltBeacon/spec): any company id (little-endian on air), beacon code
  0xBEAC, 20-byte beacon id, signed reference RSSI, one manufacturer-reserved byte.
- Eddystone (github.com/google/eddystone): service data for UUID 0xFEAA; UID 0x00 (the two RFU
  bytes are optional: the spec itself says older beacons send 0x15 instead of 0x17), URL 0x10,
  TLM 0x20 version 0 (exactly 14 bytes; temperature signed 8.8, 0x8000 = not supported;
  uptime in 0.1 s units). EID 0x30 and encrypted TLM are not reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, TypedDict

from agent.core.errors import at_byte
from agent.protocols.hextext import parse_hex

__all__ = [
    "BleParseError",
    "decode_ble_hex",
    "frames_from_ad",
    "frames_from_bleak",
    "parse_ad",
]


class IBeaconFrame(TypedDict):
    format: Literal["ibeacon"]
    uuid: str
    major: int
    minor: int
    tx_power: int


class AltBeaconFrame(TypedDict):
    format: Literal["altbeacon"]
    beacon_id: str
    manufacturer_id: int
    reference_rssi: int
    mfg_reserved: int


class EddystoneUidFrame(TypedDict):
    format: Literal["eddystone_uid"]
    namespace: str
    instance: str
    tx_power: int


class EddystoneUrlFrame(TypedDict):
    format: Literal["eddystone_url"]
    url: str
    tx_power: int


class EddystoneTlmFrame(TypedDict):
    format: Literal["eddystone_tlm"]
    version: int
    battery_mv: int
    temperature_c: float | None
    adv_count: int
    uptime_s: float


BeaconFrame = IBeaconFrame | AltBeaconFrame | EddystoneUidFrame | EddystoneUrlFrame | EddystoneTlmFrame


class BleDecoded(TypedDict):
    """The `decode ble` object (contract section 6)."""

    frames: list[BeaconFrame]


class BleParseError(ValueError):
    """Advertising data that is malformed: bad hex, a truncated AD structure, a known frame of
    the wrong length or with values its specification forbids."""


AD_MANUFACTURER_DATA = 0xFF
AD_SERVICE_DATA_16 = 0x16

APPLE_COMPANY_ID = 0x004C
IBEACON_TYPE = 0x02
IBEACON_LENGTH = 0x15
ALTBEACON_CODE = b"\xbe\xac"
EDDYSTONE_UUID16 = 0xFEAA
# bleak keys service data by the full 128-bit form of the 16-bit UUID (Bluetooth base UUID).
EDDYSTONE_UUID128 = "0000feaa-0000-1000-8000-00805f9b34fb"
_BASE_UUID_RE = re.compile(r"^0000([0-9a-f]{4})-0000-1000-8000-00805f9b34fb$")

EDDYSTONE_UID = 0x00
EDDYSTONE_URL = 0x10
EDDYSTONE_TLM = 0x20
EDDYSTONE_EID = 0x30

URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
URL_EXPANSIONS = (
    ".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
    ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov",
)  # fmt: skip
URL_MAX_ENCODED = 17  # Eddystone-URL: "Encoded URL, length 0-17"


def parse_ad(data: bytes) -> list[tuple[int, bytes]]:
    """Split advertising data into its AD structures as (AD type, data) pairs.

    Each structure is a length byte (covering type and data), a type byte and the data.
    A zero length byte ends the significant part (the rest is padding). Data longer than the
    31 bytes of legacy advertising (extended advertising) is accepted.
    """
    structures: list[tuple[int, bytes]] = []
    i = 0
    end = len(data)
    while i < end:
        length = data[i]
        if length == 0:
            break
        if i + 1 + length > end:
            raise BleParseError(
                f"AD structure {at_byte(i)} claims {length} bytes but only {end - i - 1} remain"
            )
        structures.append((data[i + 1], bytes(data[i + 2 : i + 1 + length])))
        i += 1 + length
    return structures


def frames_from_ad(data: bytes) -> list[BeaconFrame]:
    """The beacon frames (contract section 6) carried by raw advertising data, in AD order."""
    frames: list[BeaconFrame] = []
    for ad_type, payload in parse_ad(data):
        if ad_type == AD_MANUFACTURER_DATA:
            if len(payload) < 2:
                continue  # a company id alone carries no frame
            company = int.from_bytes(payload[:2], "little")
            frame = _manufacturer_frame(company, payload[2:])
        elif ad_type == AD_SERVICE_DATA_16:
            if len(payload) < 2:
                continue
            uuid16 = int.from_bytes(payload[:2], "little")
            frame = _service_frame(uuid16, payload[2:])
        else:
            continue
        if frame is not None:
            frames.append(frame)
    return frames


def frames_from_bleak(
    manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]
) -> list[BeaconFrame]:
    """The same frames from bleak's AdvertisementData fields.

    `manufacturer_data` maps company id to the data after the company id bytes;
    `service_data` maps 128-bit UUID strings to the data after the UUID.
    """
    frames: list[BeaconFrame] = []
    for company, payload in manufacturer_data.items():
        frame = _manufacturer_frame(company, bytes(payload))
        if frame is not None:
            frames.append(frame)
    for uuid, payload in service_data.items():
        match = _BASE_UUID_RE.match(uuid.lower())
        if match is None:
            continue  # only 16-bit UUIDs (in base-UUID form) carry the frames we know
        frame = _service_frame(int(match.group(1), 16), bytes(payload))
        if frame is not None:
            frames.append(frame)
    return frames


def decode_ble_hex(text: str) -> BleDecoded:
    """Decode advertising data given as hex (spaces, colons and a 0x prefix allowed)."""
    try:
        data = parse_hex(text)
    except ValueError as exc:
        raise BleParseError(str(exc)) from None
    return {"frames": frames_from_ad(data)}


# --- frame decoders shared by both paths -------------------------------------------------


def _manufacturer_frame(company: int, payload: bytes) -> BeaconFrame | None:
    if payload[:2] == ALTBEACON_CODE:
        return _altbeacon(company, payload)
    if company == APPLE_COMPANY_ID and payload[:1] == bytes([IBEACON_TYPE]):
        return _ibeacon(payload)
    return None


def _service_frame(uuid16: int, payload: bytes) -> BeaconFrame | None:
    if uuid16 != EDDYSTONE_UUID16 or not payload:
        return None
    frame_type = payload[0]
    if frame_type == EDDYSTONE_UID:
        return _eddystone_uid(payload)
    if frame_type == EDDYSTONE_URL:
        return _eddystone_url(payload)
    if frame_type == EDDYSTONE_TLM:
        return _eddystone_tlm(payload)
    return None  # EID and frame types this spec revision does not define


def _signed8(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def _ibeacon(payload: bytes) -> IBeaconFrame:
    # type(1) length(1) uuid(16) major(2) minor(2) power(1)
    if len(payload) != 23 or payload[1] != IBEACON_LENGTH:
        raise BleParseError(f"iBeacon frame must be 23 bytes with length 0x15, got {len(payload)} bytes")
    u = payload[2:18].hex()
    return {
        "format": "ibeacon",
        "uuid": f"{u[0:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}",
        "major": int.from_bytes(payload[18:20], "big"),
        "minor": int.from_bytes(payload[20:22], "big"),
        "tx_power": _signed8(payload[22]),
    }


def _altbeacon(company: int, payload: bytes) -> AltBeaconFrame:
    # beacon code(2) beacon id(20) reference rssi(1) mfg reserved(1)
    if len(payload) != 24:
        raise BleParseError(f"AltBeacon frame must be 24 bytes after the company id, got {len(payload)}")
    return {
        "format": "altbeacon",
        "beacon_id": payload[2:22].hex(),
        "manufacturer_id": company,
        "reference_rssi": _signed8(payload[22]),
        "mfg_reserved": payload[23],
    }


def _eddystone_uid(payload: bytes) -> EddystoneUidFrame:
    # frame type(1) tx(1) namespace(10) instance(6) [RFU(2)]
    if len(payload) not in (18, 20):
        raise BleParseError(f"Eddystone-UID frame must be 18 or 20 bytes, got {len(payload)}")
    return {
        "format": "eddystone_uid",
        "namespace": payload[2:12].hex(),
        "instance": payload[12:18].hex(),
        "tx_power": _signed8(payload[1]),
    }


def _eddystone_url(payload: bytes) -> EddystoneUrlFrame:
    # frame type(1) tx(1) scheme(1) encoded url(0-17)
    if len(payload) < 3 or len(payload) > 3 + URL_MAX_ENCODED:
        raise BleParseError(f"Eddystone-URL frame must be 3 to 20 bytes, got {len(payload)}")
    scheme = payload[2]
    if scheme >= len(URL_SCHEMES):
        raise BleParseError(f"Eddystone-URL scheme prefix 0x{scheme:02x} is reserved")
    parts = [URL_SCHEMES[scheme]]
    for byte in payload[3:]:
        if byte < len(URL_EXPANSIONS):
            parts.append(URL_EXPANSIONS[byte])
        elif 0x21 <= byte <= 0x7E:
            parts.append(chr(byte))
        else:
            raise BleParseError(f"Eddystone-URL byte 0x{byte:02x} is reserved")
    return {"format": "eddystone_url", "url": "".join(parts), "tx_power": _signed8(payload[1])}


def _eddystone_tlm(payload: bytes) -> EddystoneTlmFrame | None:
    if len(payload) < 2:
        raise BleParseError("Eddystone-TLM frame without a version byte")
    version = payload[1]
    if version == 0x01:
        return None  # encrypted TLM: only the EID owner can read it
    if version != 0x00:
        raise BleParseError(f"Eddystone-TLM version 0x{version:02x} is not defined")
    if len(payload) != 14:
        raise BleParseError(f"Eddystone-TLM frame must be exactly 14 bytes, got {len(payload)}")
    raw_temp = int.from_bytes(payload[4:6], "big")
    temperature = None if raw_temp == 0x8000 else int.from_bytes(payload[4:6], "big", signed=True) / 256
    return {
        "format": "eddystone_tlm",
        "version": 0,
        "battery_mv": int.from_bytes(payload[2:4], "big"),
        "temperature_c": temperature,
        "adv_count": int.from_bytes(payload[6:10], "big"),
        "uptime_s": int.from_bytes(payload[10:14], "big") / 10,
    }
