"""BLE presence analytics: configured tags by name, everyone else only as counts.

Pure logic: every call takes the time (`now`, Unix seconds) and nothing here reads a clock,
logs, or touches a file. Events leave through the `emit` callable given at construction. The
core imports nothing outside `agent.core`: the `[ble]` section arrives as `PresenceParams`
(`BleConfig.presence_params()`), and `TagClassifier` is handed the advertisement parser.

Configured tags (staff badges, baskets, the opted-in member app's token) give
`presence.arrive`, `presence.zone` and `presence.leave`, with `data`
`{"tag", "kind", "token"?, "zone", "dwell_s"}`:

- `tag` is the configured name when the entry pins one beacon, else `name:ident`; for
  `member_app` it is the configured name and `token` carries the ident.
- `ident` is an iBeacon's major and minor as 8 lowercase hex digits (`major << 16 | minor`)
  or an Eddystone-UID instance (12 hex digits). Only `member_app` events carry `token`; the
  cloud links a token to a member, never the agent.
- `dwell_s` is 0 on arrive; on `presence.zone` the time spent in the zone left (named in
  `from`); on `presence.leave` the whole visit, first to last sighting (`ts` is the last
  sighting).

Every other device is only counted: one `traffic.summary` per zone and interval, `data`
`{"zone", "interval_s", "start", "end", "present", "entered", "left", "median_dwell_s",
"suppressed"}`. `present` is the number of devices in the zone at `end`; `entered` and `left`
count the moves into and out of it during the interval (a device going from one zone to
another leaves one and enters the other), so `present` = previous `present` + `entered` -
`left`. `median_dwell_s` is the median time in the zone of the devices that left it during the
interval. The first interval after a start begins at the start, not at the interval boundary.
Suppression: a count from 1 to `min_count - 1` is published as null and its name listed in
`suppressed`; `median_dwell_s` is null and listed whenever fewer than `min_count` devices left
(a median of one is that one device's dwell). Zero is published as zero. Suppressed cells can
sometimes be worked out from neighbouring intervals through the identity above; what they
protect is a single small figure read on its own, not a determined analyst.

Devices are told apart by HMAC-SHA256 of their address under a random key held in memory only
and replaced at each day boundary; the address itself is dropped as soon as the HMAC is made.
At the boundary every device still heard becomes a new one (it enters again at once, and its
entry under the old key leaves `leave_after_s` later), as with an address rotation; put the
boundary where the store is closed (`day_offset_s`, local midnight by default in the driver).

What the counts mean (README paragraph). A phone does not announce who it is: iOS and Android
advertise from random private addresses that change about every 15 minutes, and the agent
makes no attempt to link one address to the next. So a "device" here is one address for as
long as it is heard, not a phone and not a person. `present` is a fair count of advertising
devices in a zone at the end of each interval (a rotation makes one phone count twice for at
most `leave_after_s`); `entered` and `left` also count every address rotation as one leave and
one enter, and dwell times are cut off at the rotation, so visits longer than about 15 minutes
show up as several shorter ones. People without a phone, with Bluetooth off, or whose phone is
asleep are not counted at all, and one person may carry several devices (a phone and a watch).
Read the figures as a trend over days of the same store and zone, never as a number of
customers, a conversion rate, or a way to follow anyone.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.envelope import Event, UtcFormatter

DAY_S = 86400.0
_MAX_INTERVALS_PER_ROLL = 1440  # after a long pause (a suspended machine) skip ahead, don't flood
# Apple's Bluetooth SIG company id and the first byte of an iBeacon after it (the same values as
# agent.protocols.ble, which the core does not import: the parser is handed in).
_APPLE_COMPANY_ID = 0x004C
_IBEACON_TYPE = 0x02

# bleak's manufacturer data and service data in, beacon frames out (agent.protocols.ble's
# `frames_from_bleak`); raises ValueError for data that is malformed.
FramesOf = Callable[[Mapping[int, bytes], Mapping[str, bytes]], Iterable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class ZoneParams:
    """A zone (see agent.presence_config.BleZoneConfig for what each field means)."""

    name: str
    adapter: str | None = None
    min_rssi: float | None = None
    hysteresis_db: float = 4.0


@dataclass(frozen=True, slots=True)
class TagRule:
    """A configured tag family (see agent.presence_config.BleTagConfig), identifiers normalised."""

    name: str
    kind: str
    ibeacon_uuid: str | None = None
    major: int | None = None
    minor: int | None = None
    eddystone_namespace: str | None = None
    instance: str | None = None

    @property
    def pinned(self) -> bool:
        """Whether this entry names one single beacon rather than a family of them."""
        if self.ibeacon_uuid is not None:
            return self.major is not None and self.minor is not None
        return self.instance is not None


@dataclass(frozen=True, slots=True)
class PresenceParams:
    """What `Presence` needs of the `[ble]` section, as the core's own type (the core imports no config)."""

    adapter: str = "hci0"
    interval_s: float = 60.0
    min_count: int = 3
    leave_after_s: float = 30.0
    rssi_smoothing: float = 0.3
    zones: tuple[ZoneParams, ...] = ()
    tags: tuple[TagRule, ...] = ()


@dataclass(frozen=True, slots=True)
class TagMatch:
    """A configured tag recognised in an advertisement."""

    identity: tuple[str, str]  # (configured name, ident): one track per physical tag or token
    tag: str
    kind: str
    token: str | None


class TagMatcher:
    """Finds the configured tag (if any) among an advertisement's beacon frames."""

    def __init__(self, tags: Iterable[TagRule]) -> None:
        self._ibeacon: dict[str, list[TagRule]] = {}
        self._eddystone: dict[str, list[TagRule]] = {}
        for tag in tags:
            if tag.ibeacon_uuid is not None:
                self._ibeacon.setdefault(tag.ibeacon_uuid, []).append(tag)
            else:
                assert tag.eddystone_namespace is not None
                self._eddystone.setdefault(tag.eddystone_namespace, []).append(tag)
        # The entry that pins more of the identity wins over a family entry of the same UUID.
        for rules in (*self._ibeacon.values(), *self._eddystone.values()):
            rules.sort(
                key=lambda t: -((t.major is not None) + (t.minor is not None) + (t.instance is not None))
            )
        self._matches: dict[tuple[str, str], TagMatch] = {}

    @property
    def wants_ibeacon(self) -> bool:
        """Whether any configured tag is an iBeacon."""
        return bool(self._ibeacon)

    @property
    def wants_eddystone(self) -> bool:
        """Whether any configured tag is an Eddystone-UID beacon."""
        return bool(self._eddystone)

    def match(self, frames: Iterable[Mapping[str, Any]]) -> TagMatch | None:
        """The first frame that a configured tag matches, as a TagMatch; None if none does."""
        for frame in frames:
            fmt = frame["format"]
            if fmt == "ibeacon":
                rules = self._ibeacon.get(frame["uuid"])
                if rules:
                    major, minor = frame["major"], frame["minor"]
                    for rule in rules:
                        if (rule.major is None or rule.major == major) and (
                            rule.minor is None or rule.minor == minor
                        ):
                            return self._match(rule, f"{major << 16 | minor:08x}")
            elif fmt == "eddystone_uid":
                rules = self._eddystone.get(frame["namespace"])
                if rules:
                    instance = frame["instance"]
                    for rule in rules:
                        if rule.instance is None or rule.instance == instance:
                            return self._match(rule, instance)
        return None

    def _match(self, rule: TagRule, ident: str) -> TagMatch:
        key = (rule.name, ident)
        found = self._matches.get(key)
        if found is None:
            if len(self._matches) >= 65536:  # rotating tokens: keep the memo bounded
                self._matches.clear()
            if rule.kind == "member_app":
                found = TagMatch(key, rule.name, rule.kind, ident)
            else:
                found = TagMatch(key, rule.name if rule.pinned else f"{rule.name}:{ident}", rule.kind, None)
            self._matches[key] = found
        return found


class TagClassifier:
    """Parses an advertisement's bleak fields and matches configured tags, remembering results.

    Tags are iBeacons or Eddystone-UID beacons, so an advertisement with neither Apple
    manufacturer data of the iBeacon type nor service data (most phones) is anonymous without
    being parsed. The rest are parsed once per payload (company ids, service UUIDs and their
    bytes; the address is no part of the key): a beacon repeats the same bytes.
    """

    __slots__ = ("_matcher", "_frames_of", "_ibeacon", "_eddystone", "_cache", "_cache_size", "parse_errors")

    def __init__(self, tags: Iterable[TagRule], frames_of: FramesOf, *, cache_size: int = 8192) -> None:
        self._matcher = TagMatcher(tags)
        self._frames_of = frames_of
        self._ibeacon = self._matcher.wants_ibeacon
        self._eddystone = self._matcher.wants_eddystone
        self._cache: dict[tuple, TagMatch | None] = {}
        self._cache_size = cache_size
        self.parse_errors = 0

    def classify(
        self, manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]
    ) -> TagMatch | None:
        """The configured tag this advertisement comes from, or None for an anonymous device."""
        if not (service_data and self._eddystone):
            apple = manufacturer_data.get(_APPLE_COMPANY_ID) if self._ibeacon else None
            if not apple or apple[0] != _IBEACON_TYPE:
                return None  # cannot carry a configured tag's frame
        key = (tuple(manufacturer_data.items()), tuple(service_data.items()))
        try:
            return self._cache[key]
        except KeyError:
            pass
        try:
            found = self._matcher.match(self._frames_of(manufacturer_data, service_data))
        except ValueError:  # the parser's error for malformed data (BleParseError)
            self.parse_errors += 1
            found = None
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # phones rotate their payloads too: start over rather than grow
        self._cache[key] = found
        return found


class DailyKey:
    """HMAC-SHA256 of device addresses under a random key replaced at every day boundary.

    `key_source()` gives fresh random key bytes; the day boundary falls where
    `(now + day_offset_s) % 86400 == 0` (the local midnight when `day_offset_s` is the local
    UTC offset). The key lives in this object only.
    """

    __slots__ = ("_key_source", "_offset", "_until", "_inner", "_outer", "rotations")

    def __init__(self, key_source: Callable[[], bytes], day_offset_s: float = 0.0) -> None:
        self._key_source = key_source
        self._offset = day_offset_s
        self._until = -math.inf
        self._inner: Any = None
        self._outer: Any = None
        self.rotations = 0

    def digest(self, address: str, now: float) -> bytes:
        """The counting key of `address` today."""
        if now >= self._until:
            self._rotate(now)
        # HMAC (RFC 2104) with the padded key's hash states precomputed: half the cost of hmac.digest.
        inner = self._inner.copy()
        inner.update(address.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _rotate(self, now: float) -> None:
        key = self._key_source()
        if len(key) < 16:
            raise ValueError("the counting key must be at least 16 bytes")
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        day = math.floor((now + self._offset) / DAY_S)
        self._until = (day + 1) * DAY_S - self._offset
        self.rotations += 1


class _Track:
    """One tag or one anonymous address: its smoothed RSSI per receiver and where it is."""

    __slots__ = ("readings", "last_heard", "zone", "zone_since", "arrived", "last_seen")

    def __init__(self) -> None:
        self.readings: dict[str, list[float]] = {}  # receiver -> [smoothed RSSI, last heard]
        self.last_heard = 0.0
        self.zone: str | None = None  # None: not (or no longer) placed in any zone
        self.zone_since = 0.0
        self.arrived = 0.0
        self.last_seen = 0.0  # last sighting that placed it in a zone


class _ZoneCounts:
    __slots__ = ("present", "entered", "left", "dwells")

    def __init__(self) -> None:
        self.present = 0
        self.entered = 0
        self.left = 0
        self.dwells: list[float] = []


class Presence:
    """Tracks configured tags and anonymous devices; emits presence events and traffic summaries.

    Call `observe` for every advertisement and `tick` about once a second (it ends visits that
    timed out and closes intervals). Both take `now` in Unix seconds, never decreasing.
    """

    __slots__ = (
        "_emit", "_source", "_key", "_digest", "_leave_after", "_alpha", "_interval", "_min_count",
        "_zones", "_counts", "_tags", "_anon", "_start", "_end", "_fmt",
    )  # fmt: skip

    def __init__(
        self,
        config: PresenceParams,
        emit: Callable[[Event], None],
        *,
        key_source: Callable[[], bytes],
        day_offset_s: float = 0.0,
        source: str | None = None,
    ) -> None:
        self._emit = emit
        self._source = source or f"ble:{config.adapter}"
        self._key = DailyKey(key_source, day_offset_s)
        self._digest = self._key.digest
        self._leave_after = config.leave_after_s
        self._alpha = config.rssi_smoothing
        self._interval = float(config.interval_s)
        self._min_count = config.min_count
        zones = config.zones
        # (name, adapter, min_rssi, hysteresis): an empty zone list means one zone that takes all.
        self._zones: tuple[tuple[str, str | None, float | None, float], ...] = (
            tuple((z.name, z.adapter, z.min_rssi, z.hysteresis_db) for z in zones)
            if zones
            else (("store", None, None, 0.0),)
        )
        self._counts = {name: _ZoneCounts() for name, *_ in self._zones}
        self._tags: dict[tuple[str, str], tuple[_Track, TagMatch]] = {}
        self._anon: dict[bytes, _Track] = {}
        self._start = math.nan
        self._end = math.nan
        self._fmt = UtcFormatter()

    @property
    def zone_names(self) -> list[str]:
        """The zones summaries are made for, in config order."""
        return [name for name, *_ in self._zones]

    def tracked(self) -> tuple[int, int]:
        """How many tags and anonymous addresses are held in memory right now."""
        return len(self._tags), len(self._anon)

    def observe(self, address: str, rssi: float, tag: TagMatch | None, adapter: str, now: float) -> None:
        """Take one advertisement: heard by receiver `adapter` at `rssi` dBm at time `now`.

        `tag` is what `TagClassifier.classify` found (None for anonymous devices); `address`
        is used only to make the anonymous counting key, and only when `tag` is None.
        """
        if not now < self._end:
            self._roll(now)
        if tag is None:
            key = self._digest(address, now)
            track = self._anon.get(key)
            if track is None:
                track = self._anon[key] = _Track()
        else:
            entry = self._tags.get(tag.identity)
            if entry is None:
                track = _Track()
                self._tags[tag.identity] = (track, tag)
            else:
                track = entry[0]
        leave_after = self._leave_after
        if track.zone is not None and now - track.last_seen >= leave_after:
            self._leave(track, tag)  # timed out before tick saw it: a new visit starts now

        reading = track.readings.get(adapter)
        if reading is None:
            track.readings[adapter] = reading = [float(rssi), now]
        else:
            if now - reading[1] >= leave_after:
                reading[0] = float(rssi)  # no recent reading to smooth against
            else:
                reading[0] += self._alpha * (rssi - reading[0])
            reading[1] = now
        track.last_heard = now

        zone = self._zone_of(track, reading[0], now)
        if zone is None:
            return  # heard but placed nowhere: the visit (if any) ends when it times out
        track.last_seen = now
        current = track.zone
        if current is None:
            track.zone = zone
            track.zone_since = now
            track.arrived = now
            if tag is None:
                counts = self._counts[zone]
                counts.entered += 1
                counts.present += 1
            else:
                self._tag_event("presence.arrive", tag, now, {"zone": zone, "dwell_s": 0.0})
        elif zone != current:
            dwell = now - track.zone_since
            track.zone = zone
            track.zone_since = now
            if tag is None:
                old = self._counts[current]
                old.left += 1
                old.present -= 1
                old.dwells.append(dwell)
                new = self._counts[zone]
                new.entered += 1
                new.present += 1
            else:
                data = {"zone": zone, "from": current, "dwell_s": round(dwell, 1)}
                self._tag_event("presence.zone", tag, now, data)

    def tick(self, now: float) -> None:
        """End the visits not seen for `leave_after_s` and close the intervals that are over."""
        if not now < self._end:
            self._roll(now)
        self._expire(now)

    # --- internals -------------------------------------------------------------------------

    def _zone_of(self, track: _Track, value: float, now: float) -> str | None:
        readings = track.readings
        if len(readings) == 1:
            best = value  # one receiver: the reading just taken
        else:
            limit = now - self._leave_after
            for stale in [a for a, (_, heard) in readings.items() if heard <= limit]:
                del readings[stale]  # a receiver that lost it has no say
            best = max(r[0] for r in readings.values())
        current = track.zone
        for name, adapter, min_rssi, hysteresis in self._zones:
            slack = hysteresis if name == current else 0.0
            if adapter is None:
                level = best
            else:
                reading = readings.get(adapter)
                if reading is None:
                    continue
                level = reading[0]
                if level + slack < best:
                    continue  # another receiver hears it better
            if min_rssi is not None and level + slack < min_rssi:
                continue
            return name
        return None

    def _leave(self, track: _Track, tag: TagMatch | None) -> None:
        zone = track.zone
        assert zone is not None
        if tag is None:
            counts = self._counts[zone]
            counts.left += 1
            counts.present -= 1
            counts.dwells.append(track.last_seen - track.zone_since)
        else:
            data = {"zone": zone, "dwell_s": round(track.last_seen - track.arrived, 1)}
            self._tag_event("presence.leave", tag, track.last_seen, data)
        track.zone = None

    def _expire(self, now: float) -> None:
        limit = now - self._leave_after
        anon = self._anon
        for key in [k for k, t in anon.items() if t.last_heard <= limit or (t.zone and t.last_seen <= limit)]:
            track = anon[key]
            if track.zone is not None:
                self._leave(track, None)
            if track.last_heard <= limit:
                del anon[key]
        tags = self._tags
        for identity in [
            i for i, (t, _) in tags.items() if t.last_heard <= limit or (t.zone and t.last_seen <= limit)
        ]:
            track, tag = tags[identity]
            if track.zone is not None:
                self._leave(track, tag)
            if track.last_heard <= limit:
                del tags[identity]

    def _roll(self, now: float) -> None:
        if math.isnan(self._end):
            self._start = now
            self._end = (math.floor(now / self._interval) + 1) * self._interval
            return
        emitted = 0
        while now >= self._end:
            self._expire(self._end)
            self._summarise()
            self._start = self._end
            self._end += self._interval
            emitted += 1
            if emitted >= _MAX_INTERVALS_PER_ROLL and now >= self._end:
                self._expire(now)
                self._start = now
                self._end = (math.floor(now / self._interval) + 1) * self._interval

    def _summarise(self) -> None:
        start = self._fmt.format(int(self._start * 1000))
        end = self._fmt.format(int(self._end * 1000))
        interval_s = self._interval if self._interval % 1 else int(self._interval)
        for zone, counts in self._counts.items():
            suppressed: list[str] = []
            data: dict[str, Any] = {"zone": zone, "interval_s": interval_s, "start": start, "end": end}
            for name in ("present", "entered", "left"):
                value = getattr(counts, name)
                if 0 < value < self._min_count:
                    value = None
                    suppressed.append(name)
                data[name] = value
            median = None
            if counts.dwells:
                if len(counts.dwells) < self._min_count:
                    suppressed.append("median_dwell_s")
                else:
                    median = round(statistics.median(counts.dwells), 1)
            data["median_dwell_s"] = median
            data["suppressed"] = suppressed
            self._emit(Event("traffic.summary", data, self._source, end))
            counts.entered = 0
            counts.left = 0
            counts.dwells = []

    def _tag_event(self, kind: str, tag: TagMatch, when: float, data: dict[str, Any]) -> None:
        body: dict[str, Any] = {"tag": tag.tag, "kind": tag.kind}
        if tag.token is not None:
            body["token"] = tag.token
        body.update(data)
        self._emit(Event(kind, body, self._source, self._fmt.format(int(when * 1000))))
