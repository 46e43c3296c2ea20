"""Shared fixtures: one real tiny benchmark run (real training, real SQLite store, real MLflow store)."""
import os
from pathlib import Path

# Real CIFAR-10 pixels for tests without the official files: the shared subset next to the checkout, named explicitly
# here (the product has no default for it; regbench/suites/cifar_subset.py). Set before regbench is imported.
os.environ.setdefault("REGBENCH_CIFAR10_SUBSET",
                      str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_subset" / "cifar10_subset.npz"))

import pytest  # noqa: E402
from helpers import TINY, need_postgres_driver

from regbench.cli import main

# pytest-xdist runs one test process per core (pyproject.toml's -n auto). Each would otherwise start torch with a
# thread per core, and the CLI subprocesses the tests start inherit that: N processes × N threads on N cores. Tiny
# models gain nothing from intra-op threads, so each test process and its children use one. Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _test_device() -> str:
    """The device the device-switched tests train on: $REGBENCH_TEST_DEVICE (cpu, cuda, cuda:N), default cpu.

    On CPU those tests compare results bit for bit where regbench promises it; on CUDA they use the tolerances each
    test states (cuBLAS/cuDNN kernels may reassociate sums between two runs), see ``bit_exact``."""
    name = os.environ.get("REGBENCH_TEST_DEVICE", "cpu").strip() or "cpu"
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        pytest.exit(f"REGBENCH_TEST_DEVICE={name!r} is not a device; use cpu, cuda or cuda:N", returncode=2)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            pytest.exit(f"REGBENCH_TEST_DEVICE={name!r} but this machine has {count} CUDA device(s); unset it to test "
                        f"on the CPU", returncode=2)
    elif device.type != "cpu":
        pytest.exit(f"REGBENCH_TEST_DEVICE={name!r}: only cpu and cuda[:N] are supported", returncode=2)
    return name


TEST_DEVICE = _test_device()


@pytest.fixture(scope="session")
def test_device() -> str:
    """$REGBENCH_TEST_DEVICE (default cpu), checked once at collection: an unknown or absent device stops the run."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def bit_exact(test_device) -> bool:
    """True on the CPU, where resumed/parallel runs are promised bit-for-bit; False on CUDA (compare with tolerances)."""
    return test_device == "cpu"


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
    need_postgres_driver()
    return url

