"""The bad-input matrix (issue 10, item 6): the installed `regbench` console script, run as a real subprocess on
every kind of mistake a user can make, must exit 2 with exactly one non-empty line on stderr naming the problem,
print no traceback anywhere, and leave every folder it was pointed at (a real prior run's output dir, the data
dirs) byte-for-byte as it was.

Each case gets its own copy of one real prior run (1 epoch, 1 seed), so the cases run concurrently (each subprocess
spends ~3 s importing torch) and a changed folder is blamed on the case that changed it. The out-of-range case of
each registered method is derived from the method itself, not hand-listed: the first numeric hparam for which
``resolve`` rejects a probe value as out of range (methods/base.py declares ranges in ``validate`` through
``check_range``, so probing it is how the range is read).

Set REGBENCH_BAD_INPUTS_MD=PATH to also write a markdown table of every command line and the line it printed.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import regbench_cli

from regbench import registry
from regbench.errors import RegbenchError

PRIOR = ["--methods", "ses,shade", "--epochs", "1", "--seeds", "1", "--train-size", "500", "--quiet"]
PROBES = ("-1", "1000000000", "-1.5", "1.5")  # tried in order until resolve() calls one out of range
WORKERS = 3  # concurrent subprocesses: the box has 2 cores and each case mostly waits on imports


@dataclass
class Case:
    """One bad command line. ``{OUT}`` is this case's copy of the prior run, ``{DATA}`` the prior run's data dir,
    ``{TMP}`` a scratch folder of this case; ``watch`` lists the further paths that must not change (or appear)."""

    argv: list[str]
    expect: tuple[str, ...]
    forbid: tuple[str, ...] = ()
    watch: list[str] = field(default_factory=list)
    setup: object = None  # callable(case_dir: Path) run before the snapshot
    skip: str | None = None


def _state(path: Path):
    """Everything under ``path`` (files with their hashes, folders) or None if absent: equal means untouched."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


def _out_of_range(name: str) -> tuple[str, str, str]:
    """(hparam, value, resolve's message) for the first numeric hparam of method ``name`` that a probe value puts
    outside its valid range; an hparam it lacks when it has no numeric one (baseline)."""
    cls = registry.method_class(name)
    for hp, default in cls.defaults.items():
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        for probe in PROBES:
            try:
                cls.resolve({hp: probe})
            except RegbenchError as exc:
                if "outside" in str(exc):
                    return hp, probe, str(exc)
    return "no_such_hparam", "1", f"method {name!r} has no hparam 'no_such_hparam'"


# ---- data files a user might have on disk ---------------------------------------------------------------------

def _cifar_pickle(path: Path, n: int = 20, label_key: bytes = b"labels") -> None:
    """A well-formed CIFAR batch in the official layout (dict of bytes keys, uint8 (N, 3072), int labels): only its
    md5 differs from the official file's."""
    import numpy as np

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     label_key: [int(i) % 10 for i in range(n)]}, f, protocol=2)


def _cifar10_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        _cifar_pickle(folder / f)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2))
    return folder


def _truncated_cifar10(root: Path) -> None:
    folder = _cifar10_folder(root)
    blob = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(blob[: len(blob) // 3])  # a download cut short


def _garbage_archive(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cifar-10-python.tar.gz").write_bytes(os.urandom(4096))


def _cifar100_without_train(root: Path) -> None:
    folder = root / "cifar-100-python"
    _cifar_pickle(folder / "test", label_key=b"fine_labels")
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}, protocol=2))


def _immutable(path: Path) -> str | None:
    """Make ``path`` unwritable for real; None on success, else why not. root ignores mode bits, so as root the
    immutable attribute is the only way (needs CAP_LINUX_IMMUTABLE and a filesystem that has it)."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        return None
    if shutil.which("chattr") is None:
        return "running as root (mode bits do not stop root) and chattr is not installed"
    proc = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"running as root and `chattr +i` failed ({proc.stderr.strip()})"
    return None


def _writable_again(path: Path) -> None:
    if path.exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
        else:
            path.chmod(0o700)


# ---- the matrix -------------------------------------------------------------------------------------------------

def _run(*args: str, data: str = "{DATA}") -> list[str]:
    return ["run", *args, "--out", "{OUT}", "--data-dir", data, "--quiet"]


def _cases() -> dict[str, Case]:
    c: dict[str, Case] = {
        # names
        "unknown method": Case(_run("--methods", "ses,nope"), ("unknown method 'nope'", "choose one of: baseline")),
        "unknown dataset": Case(_run("--methods", "ses", "--dataset", "imagenet-9k"),
                                ("unknown dataset 'imagenet-9k'",)),
        "unknown model": Case(_run("--methods", "ses", "--model", "resnet81"), ("unknown model 'resnet81'",)),
        "unknown suite": Case(["suite", "nope", "--out", "{TMP}/suite"], ("unknown suite 'nope'",),
                              watch=["{TMP}/suite"]),
        "unknown shift set": Case(_run("--methods", "ses", "--shift", "imagenet_c"), ("unknown shift set 'imagenet_c'",)),
        "unknown composite part": Case(_run("--methods", "ses+nope"), ("unknown method 'nope'",)),
        "composite names a method twice": Case(_run("--methods", "ses+ses"), ("names method 'ses' twice",)),
        "unknown data set (data verify)": Case(["data", "verify", "nope", "--data-dir", "{DATA}"],
                                               ("unknown data set 'nope'",)),
        # --set
        "--set without =": Case(_run("--methods", "ses", "--set", "ses.beta"), ("malformed --set 'ses.beta'",)),
        "--set without method": Case(_run("--methods", "ses", "--set", "beta=0.5"), ("malformed --set 'beta=0.5'",)),
        "--set without value": Case(_run("--methods", "ses", "--set", "ses.beta="), ("malformed --set 'ses.beta='",)),
        "--set for a method not run": Case(_run("--methods", "ses", "--set", "shade.weight=1"), ("not in --methods",)),
        "--set unknown hparam": Case(_run("--methods", "ses", "--set", "ses.gamma=1"), ("has no hparam 'gamma'",)),
        "--set not a number": Case(_run("--methods", "ses", "--set", "ses.beta=high"),
                                   ("ses.beta='high' is not a valid float",)),
        "--set composite part out of range": Case(_run("--methods", "ses+shade", "--set", "ses+shade.ses.beta=2"),
                                                  ("ses.beta=2.0 is outside (0, 1)",)),
        # storage
        "storage scheme unknown": Case(_run("--methods", "ses", "--storage", "bogus://nowhere"),
                                       ("--storage 'bogus://nowhere': unknown storage scheme 'bogus'",)),
        "storage folder missing": Case(_run("--methods", "ses", "--storage", "sqlite:////no/such/dir/x.db"),
                                       ("folder /no/such/dir does not exist",)),
        "storage not a URL": Case(_run("--methods", "ses", "--storage", "just words"), ("not a URL",)),
        "storage journal folder missing": Case(_run("--methods", "ses", "--storage", "journal:/no/such/dir/j.log"),
                                               ("folder /no/such/dir does not exist",)),
        "storage server down (password hidden)": Case(
            _run("--methods", "ses", "--storage", "postgresql://alice:s3cret-pw@127.0.0.1:1/nodb"),
            ("cannot open storage 'postgresql://alice:***@127.0.0.1:1/nodb'",), forbid=("s3cret",)),
        # output dir
        "output dir under a regular file": Case(
            ["run", "--methods", "ses", "--out", "{TMP}/a-file/out", "--data-dir", "{DATA}", "--quiet"],
            ("--out", "a-file/out' lies under", "a-file, which is a file"), watch=["{TMP}/a-file"],
            setup=lambda d: (d / "a-file").write_text("keep me")),
        "output dir is a file": Case(
            ["run", "--methods", "ses", "--out", "{TMP}/a-file", "--data-dir", "{DATA}", "--quiet"],
            ("is a file, not a directory",), watch=["{TMP}/a-file"],
            setup=lambda d: (d / "a-file").write_text("keep me")),
        "output dir unwritable": Case(_run("--methods", "ses,shade", "--seeds", "2"),
                                      ("--out", "cannot write to")),
        "output dir in use by another run": Case(_run(*PRIOR[:-1]), ("is in use by regbench pid",)),
        # data files
        "cifar10 files missing": Case(_run("--methods", "ses", "--dataset", "cifar10", data="{TMP}/d"),
                                      ("missing", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
                                      watch=["{TMP}/d"], setup=lambda d: (d / "d").mkdir()),
        "cifar100 train file missing": Case(
            _run("--methods", "ses", "--dataset", "cifar100", data="{TMP}/d"),
            ("missing data file", "cifar-100-python/train"), watch=["{TMP}/d"],
            setup=lambda d: _cifar100_without_train(d / "d")),
        "cifar10 truncated pickle": Case(
            _run("--methods", "ses", "--dataset", "cifar10", data="{TMP}/d"),
            ("data_batch_1 has md5", "expected c99cafc152244af753f735de768cd75f"), watch=["{TMP}/d"],
            setup=lambda d: _truncated_cifar10(d / "d")),
        "cifar10 wrong md5 (well-formed file)": Case(
            _run("--methods", "ses", "--dataset", "cifar10", data="{TMP}/d"),
            ("data_batch_1 has md5", "corrupt or incomplete"), watch=["{TMP}/d"],
            setup=lambda d: _cifar10_folder(d / "d")),
        "cifar10 garbage archive": Case(
            _run("--methods", "ses", "--dataset", "cifar10", data="{TMP}/d"),
            ("cifar-10-python.tar.gz has md5", "expected c58f30108f718f92721af3b95e74349a"), watch=["{TMP}/d"],
            setup=lambda d: _garbage_archive(d / "d")),
        "data verify finds a corrupt file": Case(["data", "verify", "cifar10", "--data-dir", "{TMP}/d"],
                                                 ("corrupt files in cifar10",), watch=["{TMP}/d"],
                                                 setup=lambda d: _truncated_cifar10(d / "d")),
        "mnist_m archive missing": Case(_run("--methods", "shade", "--dataset", "mnist_m"), ("MNIST-M is missing",)),
        # sizes, rules, conflicts
        "train size too small": Case(_run("--methods", "ses", "--train-size", "5"), ("train_size must be between 10",)),
        "train per class 0": Case(_run("--methods", "ses", "--train-per-class", "0"),
                                  ("--train-per-class 0 is outside 1..",)),
        "train size and per class": Case(_run("--methods", "ses", "--train-size", "300", "--train-per-class", "5"),
                                         ("give --train-size or --train-per-class, not both",)),
        "layer rule selects nothing": Case(_run("--methods", "shade", "--set", "shade.layers=name:nothing*"),
                                           ("layer rule 'name:nothing*': selects no layer",)),
        "layer rule unknown": Case(_run("--methods", "ses", "--set", "ses.layers=everything"),
                                   ("layer rule 'everything': unknown",)),
        "crop_flip on 1-D signals": Case(_run("--methods", "ses", "--augment", "crop_flip"),
                                         ("--augment crop_flip needs image inputs",)),
        "learning rate NaN": Case(_run("--methods", "ses", "--lr", "nan"), ("--lr must be a finite number, got nan",)),
        "weight decay infinite": Case(_run("--methods", "ses", "--weight-decay", "inf"),
                                      ("--weight-decay must be a finite number, got inf",)),
        "hparam NaN": Case(_run("--methods", "ses", "--set", "ses.lam=nan"), ("ses.lam=nan is outside [0, inf)",)),
        "epochs 0": Case(_run("--methods", "ses", "--epochs", "0"), ("--epochs 0 is outside 1..100000",)),
        "seeds not a number": Case(_run("--methods", "ses", "--seeds", "three"), ("--seeds 'three'",)),
        "seeds repeated": Case(_run("--methods", "ses", "--seeds", "1,1"), ("seeds must be distinct",)),
        "benchmark name with a colon": Case(_run("--methods", "ses", "--name", "a:b"), ("benchmark name 'a:b'",)),
        "--methods missing": Case(["run", "--out", "{OUT}"], ("the following arguments are required: --methods",)),
        # checkpoints
        "corrupt checkpoint": Case(_run(*PRIOR[:5], "2", *PRIOR[6:-1]), ("is not a readable torch file",)),
        "truncated checkpoint": Case(_run(*PRIOR[:5], "2", *PRIOR[6:-1]), ("is not a readable torch file",)),
        "checkpoint holding a pickled object": Case(_run(*PRIOR[:5], "2", *PRIOR[6:-1]),
                                                    ("holds a pickled object", "refused unread")),
        # the other commands on a missing or non-benchmark dir
        "report on a missing dir": Case(["report", "{TMP}/none"], ("holds no store",), watch=["{TMP}/none"]),
        "report on a non-benchmark dir": Case(["report", "{DATA}"], ("holds no store",)),
        "report on a garbage store": Case(["report", "{TMP}/g"], ("is not a SQLite database",), watch=["{TMP}/g"],
                                          setup=lambda d: (d / "g").mkdir() or (d / "g" / "regbench.db").write_bytes(
                                              b"not a database" * 100)),
        "report --margin 0": Case(["report", "{OUT}", "--margin", "0"], ("--margin 0.0 must be > 0",)),
        "status on a missing dir": Case(["status", "{TMP}/none"], ("none' does not exist",), watch=["{TMP}/none"]),
        "status on a non-benchmark dir": Case(["status", "{DATA}"], ("holds no store",)),
        "worker on an unknown benchmark": Case(
            ["worker", "--storage", "sqlite:///{OUT}/regbench.db", "--name", "nope", "--data-dir", "{DATA}",
             "--checkpoint-dir", "{TMP}/ck"],
            ("benchmark 'nope' does not exist in this storage", "mnist1d-cnn1d"), watch=["{TMP}/ck"]),
        "worker on a missing store folder": Case(
            ["worker", "--storage", "sqlite:///{TMP}/none/regbench.db", "--name", "x", "--data-dir", "{DATA}",
             "--checkpoint-dir", "{TMP}/ck"], ("does not exist",), watch=["{TMP}/none", "{TMP}/ck"]),
        "sync-mlflow on a missing dir": Case(["sync-mlflow", "{TMP}/none"], ("none' does not exist",),
                                             watch=["{TMP}/none"]),
        "sync-mlflow on a non-benchmark dir": Case(["sync-mlflow", "{DATA}"], ("holds no store",)),
        "export on a missing dir": Case(["export", "{TMP}/none"], ("holds no store",), watch=["{TMP}/none"]),
        "export on a non-benchmark dir": Case(["export", "{DATA}"], ("holds no store",)),
        "launch an unknown benchmark": Case(["launch", "--name", "nope", "--storage", "sqlite:///{OUT}/regbench.db",
                                             "--out", "{TMP}/l", "--data-dir", "{DATA}"],
                                            ("benchmark 'nope' does not exist",), watch=["{TMP}/l"]),
        "suite with one seed": Case(["suite", "ses-rings", "--seeds", "1", "--out", "{TMP}/suite"],
                                    ("--seeds 1 is too few for suite 'ses-rings'",), watch=["{TMP}/suite"]),
    }
    for name in registry.method_names():  # every registered method, third-party ones included
        hp, value, message = _out_of_range(name)
        c[f"out of range: {name}"] = Case(_run("--methods", name, "--set", f"{name}.{hp}={value}"),
                                          (message,))
    return c


CASES = _cases()


def _fill(arg: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        arg = arg.replace("{" + key + "}", str(path))
    return arg


def _checkpoint_key_of_next_run(out: Path) -> str:
    """The config key of the run `PRIOR` with `--seeds 2` trains next (baseline, seed 1): where its checkpoint sits."""
    import optuna

    from regbench.config import RunConfig

    storage = f"sqlite:///{out}/regbench.db"
    trial = optuna.load_study(study_name="mnist1d-cnn1d:baseline:final", storage=storage).trials[0]
    return RunConfig.from_json(trial.user_attrs["config"]).replace(seed=1).key()


def _selected(session) -> list[str]:
    """The cases this session runs (all, unless narrowed with -k): only those are started."""
    chosen = {item.callspec.params["name"] for item in session.items
              if item.module.__name__ == __name__ and hasattr(item, "callspec") and "name" in item.callspec.params}
    return [name for name in CASES if name in chosen]


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    """Run every selected case once (concurrently), each against its own copy of one real prior run; returns
    {case: (argv, CompletedProcess, {path: (before, after)}, seconds) or a skip reason}."""
    cases = _selected(request.session)
    root = tmp_path_factory.mktemp("matrix")
    prior, data = root / "prior", root / "data"
    proc = regbench_cli("run", *PRIOR, "--out", str(prior), "--data-dir", str(data), cwd=root)
    assert proc.returncode == 0, proc.stderr
    key = _checkpoint_key_of_next_run(prior)

    prepared, cleanups = {}, []
    for i, name in enumerate(cases):
        case = CASES[name]
        work = root / f"case{i:02d}"
        work.mkdir()
        out = work / "out"
        shutil.copytree(prior, out)
        paths = {"OUT": out, "DATA": data, "TMP": work}
        if case.setup is not None:
            case.setup(work)
        if name == "output dir unwritable":
            why = _immutable(out)
            cleanups.append(lambda p=out: _writable_again(p))
            if why:
                prepared[name] = why
                continue
        if name == "output dir in use by another run":
            from regbench.store import OutputLock

            lock = OutputLock(out)
            lock.acquire()  # held by this (test) process: a second writer must refuse, naming our pid
            cleanups.append(lock.release)
        if name == "corrupt checkpoint":  # bytes on which torch's own unpickler raises IndexError (torch 2.x)
            (out / "checkpoints").mkdir()
            (out / "checkpoints" / f"{key}.pt").write_bytes(random.Random(2).randbytes(232))
        if name == "truncated checkpoint":  # a real checkpoint archive cut short (a disk that filled up)
            import torch

            (out / "checkpoints").mkdir()
            torch.save({"format": 1, "config_key": key, "x": torch.zeros(1000)}, out / "checkpoints" / f"{key}.pt")
            blob = (out / "checkpoints" / f"{key}.pt").read_bytes()
            (out / "checkpoints" / f"{key}.pt").write_bytes(blob[: len(blob) // 2])
        if name == "checkpoint holding a pickled object":
            import argparse

            import torch

            (out / "checkpoints").mkdir()
            torch.save({"format": 1, "config_key": key, "x": argparse.Namespace(a=1)}, out / "checkpoints" / f"{key}.pt")
        watched = [out, data, *(Path(_fill(w, paths)) for w in case.watch)]
        argv = [_fill(a, paths) for a in case.argv]
        prepared[name] = (argv, watched, {p: _state(p) for p in watched}, work)

    def run(name):
        if isinstance(prepared[name], str):
            return name, prepared[name]
        argv, watched, before, work = prepared[name]
        started = time.perf_counter()
        done = regbench_cli(*argv, env_extra={"REGBENCH_DATA": str(work / "default-data")}, cwd=work)
        seconds = time.perf_counter() - started
        return name, (argv, done, {p: (before[p], _state(p)) for p in watched}, seconds)

    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            found = dict(pool.map(run, cases))
    finally:
        for undo in cleanups:
            undo()
    if os.environ.get("REGBENCH_BAD_INPUTS_MD"):
        _write_table(Path(os.environ["REGBENCH_BAD_INPUTS_MD"]), found, root)
    return found


def _write_table(path: Path, found: dict, root: Path) -> None:
    """Markdown: case, the command line (tmp paths shortened), exit status and the line it printed."""
    import re
    import shlex

    def short(text: str) -> str:
        text = text.replace(str(root / "data"), "DATA")
        text = re.sub(re.escape(str(root)) + r"/case\d+/out", "OUT", text)
        return re.sub(re.escape(str(root)) + r"/case\d+", "TMP", text)

    rows = ["| # | bad input | command | exit | s | stderr (the one line) |", "|---|---|---|---|---|---|"]
    for i, (name, got) in enumerate(found.items(), 1):
        if isinstance(got, str):
            rows.append(f"| {i} | {name} | – | skipped | – | {got} |")
            continue
        argv, proc, _, seconds = got
        cmd = short(shlex.join(["regbench", *argv])).replace("|", "\\|")
        line = short(proc.stderr.strip()).replace("|", "\\|").replace("\n", " ⏎ ")
        rows.append(f"| {i} | {name} | `{cmd}` | {proc.returncode} | {seconds:.1f} | {line} |")
    path.write_text(f"# Bad-input matrix ({len(found)} cases, tests/test_bad_input_matrix.py)\n\n"
                    + "\n".join(rows) + "\n")


def test_matrix_is_large_and_covers_every_method():
    assert len(CASES) >= 25
    assert {f"out of range: {m}" for m in registry.method_names()} <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, results):
    got = results[name]
    if isinstance(got, str):
        pytest.skip(got)
    _argv, proc, states, _seconds = got
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert lines[0].startswith("regbench: error: "), lines[0]
    for text in CASES[name].expect:
        assert text in lines[0], (text, lines[0])
    for text in CASES[name].forbid:
        assert text not in proc.stdout + proc.stderr
    for path, (before, after) in states.items():
        assert after == before, f"{path} changed"

