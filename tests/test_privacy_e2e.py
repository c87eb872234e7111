"""No raw BLE address reaches the disk, the log or the network: the real agent replays a recorded
trace through bleak's callback path, and its buffer file, log and MQTT payloads are searched."""

from __future__ import annotations

import json

from drivers.ble import demo_trace
from tests.support.agentproc import AgentProcess, write_config
from tests.support.subscriber import Collector
from tests.support.wait import wait_until

TRACE = demo_trace("ble_store.jsonl")


def address_forms(address: str) -> set[bytes]:
    plain = address.replace(":", "")
    forms = {address, plain, address.replace(":", "-"), address.replace(":", "_")}
    forms |= {f.lower() for f in forms} | {f.upper() for f in forms}
    # as bytes, the way a careless encoder would store them (reversed, as BlueZ/HCI orders them)
    raw = bytes.fromhex(plain)
    return {f.encode() for f in forms} | {raw.hex().encode(), raw[::-1].hex().encode()}


def test_no_address_in_buffer_log_or_payloads(tmp_path, broker):
    addresses = {json.loads(line)["address"] for line in TRACE.read_text().splitlines()}
    assert len(addresses) >= 20
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "agent.toml",
        data,
        broker.port,
        '[log]\nlevel = "debug"\n'
        "[ble]\ninterval_s = 1\nmin_count = 1\nleave_after_s = 5\n"
        f'replay = "{TRACE}"\nreplay_speed = 40\nreplay_loop = false\n'
        '[[ble.zones]]\nname = "door"\nmin_rssi = -65\n[[ble.zones]]\nname = "floor"\n'
        '[[ble.tags]]\nname = "staff"\nkind = "staff"\nibeacon_uuid = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"\n'
        '[[ble.tags]]\nname = "member-app"\nkind = "member_app"\nibeacon_uuid = "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"\n',
    )
    collector = Collector(broker.port, "retail/#").start()
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert collector.wait_for(
            lambda c: {"traffic.summary", "presence.arrive"} <= {e["type"] for e in c.events}, 60
        ), agent.log_text()[-3000:]
        assert wait_until(
            lambda: len([e for e in collector.events if e["type"] == "traffic.summary"]) >= 5, 30
        )
    finally:
        assert agent.stop() == 0
        collector.stop()
    counted = [e for e in collector.events if e["type"] == "traffic.summary"]
    assert any((e["data"]["present"] or 0) > 0 for e in counted), "the trace must have been counted"
    haystacks = {
        "buffer": b"".join(p.read_bytes() for p in data.iterdir() if p.name.startswith("buffer.db")),
        "log": (tmp_path / "agent.log").read_bytes(),
        "mqtt": b"\n".join(payload for _, payload, _ in collector.messages),
    }
    for where, haystack in haystacks.items():
        leaked = [a for a in addresses if any(form in haystack for form in address_forms(a))]
        assert not leaked, f"{len(leaked)} raw addresses found in the {where}, e.g. {leaked[:3]}"
