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
