"""The wheel is the product: built from the checkout, installed non-editable, it holds every subpackage.

methods/ and datasets/ install as regbench.methods and regbench.datasets, never as top-level packages, and the wheel
holds every package under regbench/ (issue 16: regbench.suites was missing and an installed `regbench --help`
failed). The install goes into a fresh venv that reuses this environment's dependencies through a .pth line: a
directory added that way has its own .pth files ignored, so the checkout's editable finder stays off and only the
wheel can answer `import regbench`."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
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


WALK = """
import pkgutil, importlib, regbench
names = [m.name for m in pkgutil.walk_packages(regbench.__path__, 'regbench.')]
for name in names:
    importlib.import_module(name)
print(regbench.__file__)
print(len(names), 'regbench.suites' in names, 'regbench.methods.ses' in names, 'regbench.datasets.cifar' in names)
"""


def source_copy(dest: Path) -> Path:
    """The checkout's files (tracked or not ignored) without build/ or *.egg-info: setuptools would copy a stale
    build/lib into the wheel and hide a package the configuration forgets."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_a_non_editable_wheel_install_runs_from_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    src = source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    new_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # this environment's dependencies (torch, optuna, …), without processing its .pth files (the editable finder)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (new_site / "_regbench_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                              "--no-index", str(next(wheels.glob("regbench-*.whl")))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}:/usr/bin:/bin"

    def run(*cmd):
        done = subprocess.run(list(cmd), capture_output=True, text=True, cwd=outside, env=env, timeout=300)
        assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"
        return done.stdout

    walked = run(str(py), "-c", WALK).split("\n")
    assert walked[0].startswith(str(new_site)), f"regbench imported from {walked[0]}, not from the wheel install"
    count, suites, ses, cifar = walked[1].split()
    assert int(count) > 40 and suites == ses == cifar == "True"
    script = str(env_dir / "bin" / "regbench")
    assert "usage: regbench" in run(script, "--help")
    assert "ses-cifar" in run(script, "suite", "--help")
    listed = run(script, "list", "methods")
    assert "ses:" in listed and "shade:" in listed
