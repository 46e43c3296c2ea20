"""Shared fixtures: one real tiny benchmark run (real training, real SQLite store, real MLflow store)."""
import os
from pathlib import Path

import pytest
from helpers import TINY

from regbench.cli import main


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """`regbench run --methods ses,shade` at 2 epochs × 2 seeds, in process; returns (out dir, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["run", "--methods", "ses,shade", "--out", str(out), "--data-dir", str(data_dir), *TINY])
        assert code == 0
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return out, buf.getvalue()


@pytest.fixture
def postgres_url():
    """The real PostgreSQL that .ci/run starts. Skipped with a reason where none was started, except under
    REGBENCH_REQUIRE_SERVICES=1 (CI), where a missing server fails the test instead."""
    url = os.environ.get("REGBENCH_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("REGBENCH_REQUIRE_SERVICES") == "1":
            pytest.fail("REGBENCH_REQUIRE_SERVICES=1 but REGBENCH_TEST_POSTGRES_URL is not set: PostgreSQL did not start")
        pytest.skip("set REGBENCH_TEST_POSTGRES_URL (.ci/run starts a PostgreSQL for this)")
    return url
