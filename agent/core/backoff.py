"""Reconnect delays: full-jitter `Backoff` (devices) and the uplink's two-ladder `ReconnectSchedule`.

`Backoff`: the n-th delay is uniform in [0, min(cap, base * 2**n)]; the drivers reopen devices with it.

`ReconnectSchedule` (the broker; contract section 3: at most 30 s between attempts).

Why two. Full jitter capped at 30 s made the first event after a broker outage wait a median of
9 s and up to 30 s: once the ladder reaches its cap, an agent probes on average every 15 s. But
most failed attempts cost the broker nothing: while it is down its address refuses the TCP
connection (a kernel RST) or does not answer at all. So failures are told apart by who answered:

- quiet failures (refused, unreachable, timed out, name not resolved): the *probe ladder*,
  uniform in [hi/4, hi] with hi = 1, 2, 4, 4, 4 … s (never above `cap`). An agent keeps probing
  every 1–4 s (2.5 s on average) for as long as the broker is away, so a broker that comes back is
  found after 1.4 s on average and 4 s at most, whatever the outage's length. The lower bound
  (hi/4) keeps a fleet's probes from piling up near zero; the jitter spreads a fleet that lost the
  broker at the same instant: after a few rounds each agent's phase is its own, and 3,000 agents
  meet a restarted broker at about N / 2.5 s = 1,200 connects a second for 4 s instead of all at
  once (bench/reconnect.py shows the histogram).
- answered failures (TLS handshake failed, CONNACK refused or missing, a session dropped before
  it proved healthy, a local error such as an unreadable password file): the *answer ladder*,
  "equal jitter" uniform in [hi/2, hi] with hi = 0.5 · 2^n up to `cap`. The broker did work for
  each of these, so they back off for real; the lower bound hi/2 guarantees the rate falls (a
  broker that accepts and then drops the session sees 0.03 connects a second once at the cap,
  not 4 a second forever), while the upper bound keeps the contract's 30 s.

`reset()` is called only once a session proved healthy (the uplink decides: a PUBACK for an
event batch, or some seconds connected), never on a bare CONNACK. Pure: the random source is
passed in, no clock, no I/O.
"""

from __future__ import annotations

import random

# The probe ladder's ceiling: a broker that is back is found within this many seconds.
PROBE_CAP_S = 4.0
# The probe ladder's first ceiling: the first attempt after a lost session waits 0.25–1 s.
PROBE_BASE_S = 1.0


class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [0, min(cap, base * 2**n)]."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """A success: start again from the base."""
        self.attempt = 0


class ReconnectSchedule:
    """The uplink's delay before the next connection attempt, after a quiet or an answered failure."""

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        rng: random.Random | None = None,
        probe_cap: float = PROBE_CAP_S,
        probe_base: float = PROBE_BASE_S,
    ) -> None:
        self.base = base
        self.cap = cap
        self.probe_cap = min(probe_cap, cap)
        self.probe_base = min(probe_base, self.probe_cap)
        self.attempt = 0  # failures of either kind since the last healthy session
        self.answered = 0  # answered failures since the last healthy session
        self._rng = rng or random.Random()

    def next_delay(self, answered: bool = True) -> float:
        """The delay before the next attempt; each call counts one more failure.

        `answered`: the broker (or something at its address, or a local error) answered the
        attempt with a failure, rather than nothing listening or reachable there.
        """
        if answered:
            hi = min(self.cap, self.base * (2 ** min(self.answered, 30)))
            self.answered += 1
            delay = self._rng.uniform(hi / 2, hi)
        else:
            hi = min(self.probe_cap, self.probe_base * (2 ** min(self.attempt, 30)))
            delay = self._rng.uniform(hi / 4, hi)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A session proved healthy: start both ladders again from the bottom."""
        self.attempt = 0
        self.answered = 0
