"""Shared test configuration.

Hypothesis profiles: ``quick`` (the default, and CI's: derandomised, so a
run draws the same examples every time and is green or red for a reason of
the code; the property tests take a few minutes on two cores) and
``thorough`` (randomised, thousands of examples per property), chosen with
``pytest --hypothesis-profile=thorough``.  The profile
is loaded here, at import time; hypothesis's pytest plugin loads the one
named on the command line afterwards, in ``pytest_configure``, so the option
wins.  No example database: nothing is written outside the tests' temporary
directories, and every failure found becomes an ``@example`` instead.
"""

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile("quick")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path, monkeypatch):
    """Every test gets its own index cache, so none sees another's files."""
    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "layerfs-cache"))
