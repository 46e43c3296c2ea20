"""Issue 16, item 6: a smoke suite reads the user's own CIFAR-10 files from --data-dir, never a file of the
development machine; with none there (and no $REGBENCH_CIFAR10_SUBSET, which only tests set) it stops with one line,
exit 2, nothing written."""
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("suite", ["ses-cifar"])  # shade-cifar shares check_smoke_data
def test_a_smoke_suite_without_cifar_files_says_what_is_missing(tmp_path, suite):
    env = {k: v for k, v in os.environ.items() if k not in ("REGBENCH_CIFAR10_SUBSET", "MLFLOW_TRACKING_URI")}
    out, data = tmp_path / "out", tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "regbench.cli", "suite", suite, "--smoke", "--data-dir", str(data),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"missing CIFAR-10 in {data}" in err[0] and "regbench data prepare cifar10" in err[0]
    assert not out.exists() and not data.exists()
