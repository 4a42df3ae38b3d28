"""Hypothesis profiles for the property tests (tests/models/test_properties.py,
tests/models/test_hostile.py).

- ``ci`` (default): derandomized, so every run checks the same generated models and the suite's
  time stays predictable; each property runs its CI budget (``budget(n)`` = n examples).
- ``slow`` (``make test-slow`` passes ``--hypothesis-profile=slow``): 5x the examples, fresh
  randomness every run.

Neither has a deadline: one example traces, prunes and runs a model (0.1 to 1 s).
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "slow", max_examples=1000, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Shared test helpers (model zoo, generator, exactness checks, benchmark loader) live in
# tests/support/ and are imported by their module names (``from zoo import ZOO``).
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))


@pytest.fixture
def one_thread():
    """One torch thread: small-op workloads (the digits benchmarks' smoke runs) are many times
    slower with two threads on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
