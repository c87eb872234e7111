"""Reconnect delays: exponential with full jitter, capped (contract section 3: at most 30 s)."""

from __future__ import annotations

import random


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
