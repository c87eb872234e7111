"""A pytest plugin for mutation runs only (`-p bench.mutmut_plugin`, set in pyproject's [tool.mutmut]).

Hypothesis is made deterministic (the same examples for every mutant, so a score can be compared
between runs) and its timing checks are off: under mutmut every function goes through a trampoline
and two workers share a busy machine, so a `too_slow` health check or a deadline would fail a test
for reasons that have nothing to do with the mutant, and mutmut would count that as a kill.
Explicit `@settings(max_examples=...)` on a test still wins for that key.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mutation", derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), print_blob=False
)


def pytest_configure(config: object) -> None:
    """Loaded after tests/conftest.py has loaded the suite's own profile, so this one wins."""
    settings.load_profile("mutation")
