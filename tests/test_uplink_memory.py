"""What a drain holds in memory at once: the uplink reads the backlog a few batches at a time.

An offline backlog's drain was the peak of a whole run's RSS (bench/core.py backlog): with the
in-flight window empty, the uplink read 16 batches' worth of chunk bodies (16 x 256 KB) in one
go, beside the payloads paho holds until their PUBACKs. Counted with tracemalloc (Python objects
only: SQLite's own cache is not in it), against a real mosquitto; no timing is asserted.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from agent.config import parse
from agent.core.envelope import Event
from agent.uplink import Uplink
from tests.support.buffer import open_outbox
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_until


def test_a_drain_reads_a_few_batches_at_a_time_not_the_whole_window(
    tmp_path: Path, broker: Mosquitto
) -> None:
    cfg = parse(
        f'[agent]\ntenant = "acme"\nstore = "s1"\nid = "a1"\ndata_dir = "{tmp_path}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntls = false\nbackoff_max_s = 0.5\n'.encode(),
        "test.toml",
    )
    window = cfg.mqtt.inflight * cfg.mqtt.batch_max_bytes  # 16 x 256 KB
    with open_outbox(
        tmp_path / "buffer.db", tenant="acme", store="s1", agent="a1", chunk_events=500
    ) as outbox:
        pad = "x" * 300
        for k in range(60):  # 30,000 envelopes of ~450 bytes: 13 MB, three windows' worth
            outbox.commit_sync([Event("app.pad", {"pad": pad, "i": k * 500 + i}, "api") for i in range(500)])
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            uplink = Uplink(cfg, outbox).start()
            try:
                assert wait_until(lambda: outbox.count == 0, 60)
            finally:
                uplink.stop(2)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    # the payloads in flight (a window at most) and the bodies of a few batches read at once,
    # with their copies on the way: 5.2-6.2 MB; reading a whole window at once held 8.9 MB
    bound = window + 3 * 4 * cfg.mqtt.batch_max_bytes
    assert peak < bound, (
        f"a drain held {peak / 1e6:.1f} MB of Python objects at once (bound {bound / 1e6:.1f} MB)"
    )
