"""Session-wide test environment: one local Ray, one Prefect test harness, private dirs.

Environment variables are set before Ray or Prefect are imported anywhere, so that no
test talks to a user's Prefect server or Ray cluster and nothing phones home.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lvd-tests-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("TMPDIR", str(_SESSION_TMP))
# One intra-op thread: Ray workers and the test process share 2 cores (7x faster than 2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        from lvd.curation.runner import init_ray

        init_ray(num_cpus=2)  # lvd's own local Ray: loopback only, no dashboard
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database and API server) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
