"""The `[ble]` config section: scanning, zones, configured tags and anonymous traffic counting.

```toml
[ble]
adapter = "hci0"
scanning_mode = "auto"        # "passive" | "active" | "auto" (passive where BlueZ allows it)
interval_s = 60               # one traffic.summary per zone per interval
min_count = 3                 # counts of 1..min_count-1 are published as null
leave_after_s = 30            # not heard in a zone for this long: gone

[[ble.zones]]                 # first match in this order wins: list the narrowest first
name = "door"
min_rssi = -60
hysteresis_db = 4

[[ble.zones]]
name = "aisle-3"
adapter = "hci1"              # heard best by this receiver

[[ble.tags]]
name = "staff"
kind = "staff"
ibeacon_uuid = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"   # every badge of this UUID
```
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from agent.core.presence import PresenceParams, TagRule, ZoneParams

_HEX = re.compile(r"[0-9a-f]+")
_ADAPTER = re.compile(r"[A-Za-z0-9_.-]+")


def _hex_of_length(value: str, length: int, what: str) -> str:
    text = value.strip().lower().replace("-", "").replace(":", "")
    if len(text) != length or not _HEX.fullmatch(text):
        raise ValueError(f"{what} must be {length} hex digits")
    return text


def _adapter_name(value: str) -> str:
    if not _ADAPTER.fullmatch(value):
        raise ValueError("adapter must be a name such as 'hci0'")
    return value


AdapterName = Annotated[str, AfterValidator(_adapter_name)]


class BleZoneConfig(BaseModel):
    """A zone: where a device is, from which receiver hears it best and how strongly.

    A zone with `adapter` takes only devices that this receiver hears at least as well as any
    other; a zone with `min_rssi` takes only devices whose smoothed RSSI reaches it. A device
    already in the zone stays until it falls `hysteresis_db` below either condition, so a
    device on the edge does not flap. A zone with neither takes everything heard.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    adapter: AdapterName | None = None
    min_rssi: int | None = Field(default=None, ge=-127, le=20)
    hysteresis_db: float = Field(default=4.0, ge=0, le=40)


class BleTagConfig(BaseModel):
    """A configured tag family: staff badges, baskets, or the opted-in member app's token.

    Matched by an iBeacon UUID (optionally pinned to one `major` and/or `minor`) or by an
    Eddystone-UID namespace (optionally pinned to one `instance`). For `member_app` the
    token (iBeacon major and minor as 8 hex digits, or the Eddystone instance) is what goes
    upstream; the cloud links it to a member, never the agent.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["staff", "basket", "member_app"]
    ibeacon_uuid: str | None = None
    major: int | None = Field(default=None, ge=0, le=0xFFFF)
    minor: int | None = Field(default=None, ge=0, le=0xFFFF)
    eddystone_namespace: str | None = None
    instance: str | None = None

    @field_validator("ibeacon_uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError:
            raise ValueError("ibeacon_uuid must be a UUID (8-4-4-4-12 hex)") from None

    @field_validator("eddystone_namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return None if value is None else _hex_of_length(value, 20, "eddystone_namespace")

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str | None) -> str | None:
        return None if value is None else _hex_of_length(value, 12, "instance")

    @model_validator(mode="after")
    def _one_matcher(self) -> BleTagConfig:
        if (self.ibeacon_uuid is None) == (self.eddystone_namespace is None):
            raise ValueError("a tag needs exactly one of ibeacon_uuid or eddystone_namespace")
        if self.ibeacon_uuid is None and (self.major is not None or self.minor is not None):
            raise ValueError("major and minor go with ibeacon_uuid")
        if self.eddystone_namespace is None and self.instance is not None:
            raise ValueError("instance goes with eddystone_namespace")
        return self

    @property
    def pinned(self) -> bool:
        """Whether this entry names one single beacon rather than a family of them."""
        return self.rule().pinned

    def rule(self) -> TagRule:
        """This entry as the core's TagRule."""
        return TagRule(
            self.name,
            self.kind,
            self.ibeacon_uuid,
            self.major,
            self.minor,
            self.eddystone_namespace,
            self.instance,
        )


class BleConfig(BaseModel):
    """The `[ble]` section."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = True
    adapter: AdapterName = "hci0"
    scanning_mode: Literal["passive", "active", "auto"] = "auto"
    # A scanner that reports nothing for this long is stopped and started again.
    watchdog_s: float = Field(default=90.0, gt=0)
    interval_s: int = Field(default=60, ge=1, le=86400)
    min_count: int = Field(default=3, ge=1)
    leave_after_s: float = Field(default=30.0, gt=0)
    rssi_smoothing: float = Field(default=0.3, gt=0, le=1)
    zones: list[BleZoneConfig] = Field(default_factory=list)
    tags: list[BleTagConfig] = Field(default_factory=list)
    # A recorded trace (JSON lines) played instead of a radio, for demos.
    replay: Path | None = None
    replay_speed: float = Field(default=1.0, gt=0)
    replay_loop: StrictBool = True

    @model_validator(mode="after")
    def _unique_names(self) -> BleConfig:
        for what, names in (("zone", [z.name for z in self.zones]), ("tag", [t.name for t in self.tags])):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{what} name {name!r} is used twice")
                seen.add(name)
        return self

    def presence_params(self) -> PresenceParams:
        """What agent.core.presence needs of this section, as its own dataclass."""
        return PresenceParams(
            adapter=self.adapter,
            interval_s=float(self.interval_s),
            min_count=self.min_count,
            leave_after_s=self.leave_after_s,
            rssi_smoothing=self.rssi_smoothing,
            zones=tuple(ZoneParams(z.name, z.adapter, z.min_rssi, z.hysteresis_db) for z in self.zones),
            tags=tuple(t.rule() for t in self.tags),
        )

    def adapters(self) -> list[str]:
        """Every receiver to scan with: `adapter` and each zone's own, in order, once each."""
        names = [self.adapter]
        for zone in self.zones:
            if zone.adapter is not None and zone.adapter not in names:
                names.append(zone.adapter)
        return names
