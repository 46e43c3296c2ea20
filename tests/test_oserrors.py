"""Operating-system errors are user-facing: one line naming the path and what the system said, exit 74 (EX_IOERR),
no temp or empty files left behind, and the same command resumes once the machine is fixed.

The errors are real: a small tmpfs filled to the last byte at each write point the fault hooks name
(``REGBENCH_FAULT_AT=<event>:1:full``, regbench/faults.py), a read-only mount, a symlink loop, the open-file limit.
Mounting needs root (or CAP_SYS_ADMIN): where it is not allowed the tmpfs cases skip, saying so.
"""
from __future__ import annotations

import errno
import os
import resource
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest

from regbench import faults, oserrors

RUN = ["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--seeds", "1",
       "--quiet", "--checkpoint-every-seconds", "0"]


def _mount(folder: Path, options: str = "size=64m") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"mounting a tmpfs is not allowed here ({proc.stderr.strip() or 'mount failed'}); these cases "
                    f"need root or CAP_SYS_ADMIN")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _cli(args, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", faults.ENV, faults.FILL_ENV)}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "regbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _errors(proc) -> list[str]:
    """The stderr lines that are not warnings or notes: what the user is told went wrong."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith(("regbench: warning:", "regbench: note:"))]


def _debris(folder: Path) -> list[str]:
    """Temp files, and empty files other than lock files (flock targets, empty by design)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".regbench-filler"
            and (p.name.endswith(".tmp") or (p.stat().st_size == 0 and not p.name.endswith(".lock")))]


def _finals(out: Path) -> list[list[int]]:
    storage = f"sqlite:///{out / 'regbench.db'}"
    names = [s for s in optuna.get_all_study_names(storage) if s.endswith(":final")]
    trials = optuna.load_study(study_name=names[0], storage=storage).get_trials() if names else []
    return [[int(r["epoch"]) for r in t.user_attrs["history"]] for t in trials if t.state.name == "COMPLETE"]


# ---- a full disk at every write point the fault hooks name ---------------------------------------------------------

CASES = {  # event -> extra arguments that make the run reach that point
    "epoch": [], "final": [], "mirror": [], "report": [], "tune": ["--trials", "1"], "recover": [],
}


# Rerun once the space is back (the slow half: a whole run): the store's and MLflow's write points.
RESUMED = ("epoch", "mirror")


def test_every_fault_point_is_covered():
    assert set(CASES) == set(faults.EVENTS)


def _full_disk_case(event: str, root: Path, data_dir: Path) -> dict:
    disk = root / event
    _mount(disk)
    try:
        out = disk / "out"
        args = [*RUN, *CASES[event], "--out", out, "--data-dir", data_dir]
        if event == "recover":  # a dead trial to recover: the first run is killed mid-training
            killed = _cli(args, {faults.ENV: "epoch:1"})
            assert killed.returncode == -9, killed.stderr
        full = _cli(args, {faults.ENV: f"{event}:1:full", faults.FILL_ENV: str(disk)})
        debris = _debris(out)
        (disk / ".regbench-filler").unlink(missing_ok=True)  # absent when the run ended before that point
        leaderboard = (out / "leaderboard.md").is_file()
        again = _cli(args) if event in RESUMED else None
        return {"full": full, "debris": debris, "again": again, "finals": _finals(out), "leaderboard": leaderboard}
    finally:
        _umount(disk)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("full")
    probe = root / "probe"
    _mount(probe, "size=1m")
    _umount(probe)
    with ThreadPoolExecutor(3) as pool:
        futures = {event: pool.submit(_full_disk_case, event, root, data_dir) for event in CASES}
        return {event: f.result() for event, f in futures.items()}


@pytest.mark.parametrize("event", list(CASES))
def test_a_full_disk_at_each_write_point_is_one_line_and_resumes(event, full_disk):
    case = full_disk[event]
    full = case["full"]
    assert full.returncode != 70 and "bug in regbench" not in full.stderr and "Traceback" not in full.stderr, \
        full.stderr
    if full.returncode == 0:  # the disk filled after the last write that matters (the leaderboard is written):
        assert case["leaderboard"]  # a clean end, with the warning that MLflow did not get everything
    else:
        assert full.returncode == oserrors.EXIT_IOERR, full.stderr
        [line] = _errors(full)
        assert line.startswith("regbench: error: ") and "No space left on device" in line and "ENOSPC" in line, line
    assert case["debris"] == [], case["debris"]
    if case["again"] is not None:  # the same command, with the space back: resumes, ends complete, every epoch
        assert case["again"].returncode == 0, case["again"].stderr
        assert case["finals"] == [[1, 2]]
    else:  # nothing recorded complete that is not
        assert case["finals"] in ([], [[1, 2]]), case["finals"]


# ---- the other errors, real ones, through the same translation -----------------------------------------------------

def test_a_read_only_file_system_and_a_read_only_database(tmp_path):
    ro = tmp_path / "ro"
    _mount(ro, "size=1m")
    try:
        con = sqlite3.connect(ro / "x.db")
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        with pytest.raises(OSError) as caught:
            (ro / "new.txt").write_text("x")
        failure = oserrors.translate(caught.value)
        assert "Read-only file system" in str(failure) and str(ro / "new.txt") in str(failure)
        con = sqlite3.connect(ro / "x.db")
        with pytest.raises(sqlite3.OperationalError) as caught:
            con.execute("INSERT INTO t VALUES (1)")
        con.close()
        failure = oserrors.translate(caught.value, f"store {ro / 'x.db'}")
        assert "EROFS" in str(failure) or "readonly" in str(failure), failure
        assert str(ro / "x.db") in str(failure)
    finally:
        _umount(ro)


def test_a_symlink_loop_and_the_open_file_limit(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(OSError) as caught:
        open(loop / "x")
    assert caught.value.errno == errno.ELOOP
    assert "ELOOP" in str(oserrors.translate(caught.value)) and str(loop) in str(oserrors.translate(caught.value))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        with pytest.raises(OSError) as caught:
            for _ in range(100):
                opened.append(open(os.devnull))
    finally:
        for f in opened:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.errno == errno.EMFILE
    assert "ulimit -n" in str(oserrors.translate(caught.value))


def test_a_bug_is_not_mistaken_for_the_machine():
    assert oserrors.translate(ZeroDivisionError("x")) is None
    assert oserrors.translate(KeyError("disk")) is None
    assert oserrors.translate(BrokenPipeError(errno.EPIPE, "pipe")) is None


def test_report_on_a_full_disk_keeps_the_old_leaderboard_whole(tmp_path, data_dir):
    """`regbench report` rewriting a leaderboard and its figures on a full disk: one line, exit 74, and the files of
    the previous report are left byte for byte (each is written under a temp name and renamed only when whole)."""
    disk = tmp_path / "disk"
    _mount(disk)
    try:
        out = disk / "out"
        assert _cli([*RUN, "--out", out, "--data-dir", data_dir]).returncode == 0
        before = {p.relative_to(out): p.read_bytes() for p in [out / "leaderboard.md", *(out / "figures").glob("*")]}
        faults.fill(str(disk))
        proc = _cli(["report", out, "--margin", "0.7"])  # another margin: the leaderboard's text changes
        assert proc.returncode == oserrors.EXIT_IOERR, proc.stderr
        [line] = _errors(proc)
        assert "No space left on device" in line, line
        after = {p.relative_to(out): p.read_bytes() for p in [out / "leaderboard.md", *(out / "figures").glob("*")]}
        assert after == before
        assert _debris(out) == []
    finally:
        _umount(disk)
