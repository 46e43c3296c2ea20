"""methods/ and datasets/ install as regbench.methods and regbench.datasets, never as top-level packages."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_maps_folders_into_the_package(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert not (target / "datasets").exists() and not (target / "methods").exists()
    assert (target / "regbench" / "methods" / "ses.py").is_file()
    eps = next(target.glob("regbench-*.dist-info")) / "entry_points.txt"
    assert "ses = regbench.methods.ses:SES" in eps.read_text()
    probe = subprocess.run([sys.executable, "-c", (
        "import regbench.methods.ses as s, regbench.datasets.mnist1d as d, importlib.util as u;"
        "print(s.__file__); print(d.__file__); print(u.find_spec('datasets') is None or 'regbench' not in "
        "u.find_spec('datasets').origin)")], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert probe.returncode == 0, probe.stderr
    ses_file, ds_file, no_shadow = probe.stdout.split()
    assert ses_file.startswith(str(target)) and ds_file.startswith(str(target)) and no_shadow == "True"
