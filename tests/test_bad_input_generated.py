"""The generated bad-input matrix (issue 21): every path- or URL-like argument of every command, found in the parser
itself, crossed with the hostile values of its kind (regbench/arguments.py), run as the real console script.

Each case must exit 2 with exactly one stderr line that names the argument, print no traceback, never reach the last
line of defence (exit 70, "bug in regbench"), and leave the scratch tree it was pointed at exactly as it was. An
option whose name looks like a path or URL but declares no kind fails the test, so a new option cannot slip through.
A new option declared with a kind is covered without editing this file; a new kind must add its hostile values here.

The cases are refused before anything heavy is imported (~0.1-0.3 s each), and run 4 at a time.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import regbench_cli

from regbench import arguments
from regbench.cli import build_parser
from regbench.errors import EXIT_BUG

WORKERS = 4
UNWRITABLE = "/sys/regbench-cannot-create"  # root ignores mode bits, but sysfs refuses new entries even to root
PATHY = {"out", "output", "dir", "directory", "path", "file", "storage", "uri", "url", "summary", "db", "log",
         "cache", "folder", "root", "journal", "tracking", "dest", "destination"}
NOT_PATHS: dict[str, str] = {}
# A required choice is filled with its first value, except here: the harmless one, should a check ever let a case run.
SAFE_CHOICES = {"postgres": "url"}  # "command --option": why it is not a path, for a path-looking name that is not one


def subcommands(parser, words=()):
    """(words, parser) for every leaf (sub)command, nested ones included (``data verify``, ``suite``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    yield from subcommands(sub, (*words, name))
            return
    yield words, parser


def _takes_value(action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def _looks_like_a_path(action) -> bool:
    words = [*action.option_strings, action.dest, str(action.metavar or "")]
    tokens = {t for w in words for t in re.split(r"[-_./ ]+", w.lower()) if t}
    return bool(tokens & PATHY)


def _tree(tmp: Path) -> dict[str, Path]:
    """The scratch tree every case points into: a text file, an empty file, a folder, a real SQLite database."""
    (tmp / "afile").write_text("keep me\n")
    (tmp / "empty").write_bytes(b"")
    (tmp / "adir").mkdir()
    (tmp / "adir" / "inside.txt").write_text("keep me too\n")
    with sqlite3.connect(tmp / "real.db") as con:  # a real database (not an Optuna one: the kinds only look)
        con.execute("CREATE TABLE t (x INTEGER)")
    return {"FILE": tmp / "afile", "EMPTY": tmp / "empty", "DIR": tmp / "adir", "DB": tmp / "real.db"}


def hostile(kind: arguments.Kind, tmp: Path) -> dict[str, str]:
    """The hostile values of each kind (a value that is fine for a kind, e.g. a missing folder for an output dir
    that is created on demand, is not in its list)."""
    f, d, e = tmp / "afile", tmp / "adir", tmp / "empty"
    long_path = str(tmp) + "/abc" * 1100  # > 4096 bytes, every component short
    long_name = str(tmp / ("n" * 256))  # one component > 255 bytes
    paths = {"empty": "", "root /": "/", "a file where a dir is expected": str(f), "a child of a file": f"{f}/child",
             "under an unwritable dir": f"{UNWRITABLE}/x", "control character": str(tmp / "bad\x01name"),
             "newline": str(tmp / "bad\nname"), "path > 4096 bytes": long_path, "name > 255 bytes": long_name}
    urls = {"empty": "", "sqlite empty path": "sqlite:///", "sqlite no path": "sqlite://",
            "sqlite on a dir": f"sqlite:///{d}", "sqlite on a text file": f"sqlite:///{f}",
            "sqlite under a file": f"sqlite:///{f}/child.db", "sqlite under an unwritable dir":
            f"sqlite:///{UNWRITABLE}/x.db", "sqlite newline": f"sqlite:///{tmp}/bad\nname.db",
            "sqlite control character": f"sqlite:///{tmp}/bad\x01name.db",
            "sqlite path > 4096 bytes": f"sqlite:///{long_path}.db", "sqlite name > 255 bytes":
            f"sqlite:///{long_name}.db"}
    storages = {**urls, "sqlite on an empty file": f"sqlite:///{e}", "sqlite nonexistent parent":
                f"sqlite:///{tmp}/none/x.db", "journal empty path": "journal:", "journal on a dir": f"journal:{d}",
                "journal on a text file": f"journal:{f}", "journal under a file": f"journal:{f}/child.log",
                "journal under an unwritable dir": f"journal:{UNWRITABLE}/x.log", "postgresql bad port (password kept out)":
                "postgresql://alice:s3cret@localhost:port/db", "postgresql nothing": "postgresql://",
                "unknown scheme": "bogus://x", "not a URL": "just words"}
    table = {
        "output-dir": {**paths, "an unwritable dir": "/sys"},
        "cache-dir": paths,
        "input-dir": {**paths, "nonexistent parent": str(tmp / "none" / "out")},
        "lookup-dir": {k: v for k, v in paths.items() if k != "under an unwritable dir"},
        "storage-url": storages,
        "store-url": {**storages, "sqlite nonexistent": f"sqlite:///{tmp}/missing.db",
                      "journal nonexistent": f"journal:{tmp}/missing.log"},
        "tracking-uri": {**urls, "a plain folder": UNWRITABLE, "http without host": "http://",
                         "unknown scheme": "ftp://x"},
    }
    assert kind.name in table, f"argument kind {kind.name!r} has no hostile values here: add them to the table"
    return table[kind.name]


def good(kind: arguments.Kind, tmp: Path) -> str:
    """A value each kind accepts, for required arguments that are not the one under test (never created)."""
    return {"output-dir": str(tmp / "new-out"), "cache-dir": str(tmp / "new-data"), "input-dir": str(tmp / "adir"),
            "lookup-dir": str(tmp / "adir"), "storage-url": f"sqlite:///{tmp}/new.db",
            "store-url": f"sqlite:///{tmp}/real.db", "tracking-uri": f"sqlite:///{tmp}/new-mlflow.db"}[kind.name]


def argv_for(words, parser, target, value: str, tmp: Path) -> list[str]:
    """``words`` + the required arguments (a good value of their kind, else their first choice, else "x") + the
    argument under test set to ``value``."""
    options, positionals = [], []
    for action in parser._actions:
        if not _takes_value(action) or isinstance(action, argparse._SubParsersAction):
            continue
        if action is target:
            given = value
        elif action.required:
            kind = getattr(action, "kind", None)
            given = good(kind, tmp) if kind else (SAFE_CHOICES.get(" ".join(words)) or str(list(action.choices)[0])
                                                  if action.choices else "x")
        else:
            continue
        if action.option_strings:
            options.append(f"{max(action.option_strings, key=len)}={given}")
        else:
            positionals.append(given)
    return [*words, *options, *positionals]


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    cases = []
    for words, parser in subcommands(build_parser()):
        for action in parser._actions:
            kind = getattr(action, "kind", None)
            if kind is None:
                continue
            for label, value in hostile(kind, tmp).items():
                cases.append((f"{' '.join(words)} {arguments.option_name(action)} = {label}",
                              argv_for(words, parser, action, value, tmp), arguments.option_name(action)))
    return cases


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_every_path_like_option_declares_its_kind():
    undeclared = []
    for words, parser in subcommands(build_parser()):
        for action in parser._actions:
            name = f"{' '.join(words)} {arguments.option_name(action)}"
            if _takes_value(action) and getattr(action, "kind", None) is None and _looks_like_a_path(action) \
                    and name not in NOT_PATHS:
                undeclared.append(name)
    assert not undeclared, (f"path-like arguments without a kind (declare kind= from regbench/arguments.py, or list "
                            f"them in NOT_PATHS with the reason): {undeclared}")


def test_the_walk_sees_nested_commands_and_every_kind():
    found = {(" ".join(w), arguments.option_name(a), a.kind.name) for w, p in subcommands(build_parser())
             for a in p._actions if getattr(a, "kind", None)}
    commands = {c for c, _, _ in found}
    assert {"run", "worker", "report", "data verify", "data prepare", "suite"} <= commands, commands
    assert {k for _, _, k in found} == {k.name for k in arguments.KINDS}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    work = tmp / "cwd"
    work.mkdir()
    _tree(tmp)
    cases = _cases(tmp)
    before = _snapshot(tmp)
    env = {"REGBENCH_DATA": str(tmp / "default-data"), "TMPDIR": str(tmp / "crash"), "HOME": str(tmp / "home")}

    def run(case):
        label, argv, option = case
        return label, argv, option, regbench_cli(*argv, env_extra=env, cwd=work)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(run, cases))
    return results, before, _snapshot(tmp)


def test_every_hostile_value_is_one_line_exit_2_and_changes_nothing(matrix):
    """One test, so that pytest-xdist runs the matrix once (a module fixture is built once per worker)."""
    results, before, after = matrix
    commands = {label.split(" = ")[0].rsplit(" ", 1)[0] for label, *_ in results}
    options = {label.split(" = ")[0] for label, *_ in results}
    print(f"\ngenerated bad-input matrix: {len(commands)} commands, {len(options)} path/URL arguments, "
          f"{len(results)} cases")
    assert len(options) >= 25 and len(results) >= 250
    failures = []
    for label, argv, option, proc in results:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        problems = []
        if "Traceback" in proc.stdout + proc.stderr:
            problems.append("traceback")
        if "s3cret" in proc.stdout + proc.stderr:
            problems.append("printed the password")
        if proc.returncode == EXIT_BUG or "bug in regbench" in proc.stderr:
            problems.append("the last line of defence fired")
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if len(lines) != 1 or proc.stderr.count("\n") != 1:
            problems.append(f"{len(lines)} stderr lines")
        elif not lines[0].startswith("regbench: error: ") or option not in lines[0]:
            problems.append("the line does not name the argument")
        if problems:
            failures.append(f"{label!r}: {', '.join(problems)}: {proc.stderr.strip()[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(results)} cases:\n" + "\n".join(failures)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


# ---- the last line of defence ----------------------------------------------------------------------------------

def _store_with_a_bug(folder: Path) -> Path:
    """A real Optuna store holding a real planned benchmark record; the bug is planted in the process (below), since
    a store of the wrong shape is now refused as bad input (exit 2, tests/test_readback.py)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name="bench", storage=f"sqlite:///{folder}/regbench.db")
    study.set_user_attr("spec", {"benchmark": "bench", "base": "{not json", "seeds": [0], "methods": ["baseline"]})
    return folder / "regbench.db"


def _with_a_bug(*args: str, env_extra: dict, cwd) -> subprocess.CompletedProcess:
    """The console's ``main`` with a genuine bug planted in `status` (a ZeroDivisionError), as a user would meet it."""
    code = ("import sys; from regbench import commands; "
            "commands.status_command = lambda args: (lambda: 1 / 0)(); "
            "from regbench.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **env_extra}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def _crash_line(proc) -> Path:
    assert proc.returncode == EXIT_BUG != 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("regbench: internal error: this is a bug in regbench"), lines[0]
    path = Path(re.search(r"the full traceback is in (\S+?\.txt)", lines[0]).group(1))
    assert path.is_file() and "Traceback (most recent call last)" in path.read_text(), path
    return path


def test_a_store_of_the_wrong_shape_is_bad_input_not_a_bug(tmp_path):
    out = tmp_path / "out"
    _store_with_a_bug(out)
    proc = regbench_cli("status", str(out), env_extra={"TMPDIR": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "plan of benchmark 'bench'" in proc.stderr, proc.stderr
    assert not list(out.glob("regbench-crash-*"))


def test_an_unexpected_exception_is_one_line_with_the_traceback_in_the_output_dir(tmp_path):
    out = tmp_path / "out"
    _store_with_a_bug(out)
    path = _crash_line(_with_a_bug("status", str(out), env_extra={"TMPDIR": str(tmp_path)}, cwd=tmp_path))
    assert path.parent == out.resolve()
    assert "ZeroDivisionError" in path.read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # written whole: no temp file left


def test_without_an_output_dir_the_traceback_goes_to_the_temp_dir(tmp_path):
    db = _store_with_a_bug(tmp_path / "store")
    crash = tmp_path / "crash"
    crash.mkdir()
    path = _crash_line(_with_a_bug("status", "--storage", f"sqlite:///{db}", env_extra={"TMPDIR": str(crash)},
                                   cwd=tmp_path))
    assert path.parent == crash.resolve()


def test_a_crash_file_never_lands_half_written_in_a_full_out(tmp_path):
    """OUT on a full disk: the crash report goes to the temp dir, and OUT gets neither a partial report nor a temp
    file (written under a temp name, renamed only once whole)."""
    out = tmp_path / "out"
    _store_with_a_bug(out)
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here (needs root or CAP_SYS_ADMIN)")
    try:
        shutil.copy(out / "regbench.db", full / "regbench.db")
        with open(full / "filler", "wb", buffering=0) as f:  # fill the rest, to the last byte
            try:
                while True:
                    f.write(b"\0" * 512)
                    f.flush()
            except OSError:
                pass
        crash = tmp_path / "crash"
        crash.mkdir()
        path = _crash_line(_with_a_bug("status", str(full), env_extra={"TMPDIR": str(crash)}, cwd=tmp_path))
        assert path.parent == crash.resolve()
        assert sorted(p.name for p in full.iterdir()) == ["filler", "regbench.db"]
    finally:
        subprocess.run(["umount", str(full)], check=True)


# ---- numbers: every numeric option × boundary values, and relations between values ---------------------------------

from regbench import limits  # noqa: E402
from regbench.cli import main  # noqa: E402

BOUNDARY = ["0", "-1", "1", "1.5", "1000000000000", str(2**31), str(2**63), str(2**64), "99999999999999999999",
            "nan", "inf", "-inf", "1e308"]


def _sentinel_argv(words: tuple, tmp: Path) -> tuple[list[str], str]:
    """A command line for ``words`` that, once its numbers pass, fails cleanly on something else (the sentinel,
    named by the returned text), so an accepted number never starts real work."""
    missing = f"sqlite:///{tmp}/missing.db"
    return {
        ("run",): (["run", "--methods", "no_such_method", "--dataset", "digits", "--out", str(tmp / "o")],
                   "unknown method"),
        ("worker",): (["worker", "--storage", missing, "--name", "x"], "--storage"),
        ("launch",): (["launch", "--name", "x", "--storage", missing], "--storage"),
        ("report",): (["report", str(tmp / "empty-out")], "holds no store"),
        ("suite",): (["suite", "no_such_suite", "--out", str(tmp / "o")], "no_such_suite"),
        ("postgres",): (["postgres", "url", "--dir", str(tmp / "pg")], None),
        ("ui",): (["ui", str(tmp / "missing-out")], "does not exist"),
    }[words]


def _numeric_options():
    for words, parser in subcommands(build_parser()):
        for action in parser._actions:
            if action.type in (int, float) and action.option_strings:
                yield words, max(action.option_strings, key=len), action.type


def _range(words, option):
    return limits.NUMBERS.get(f"{' '.join(words)} {option}") or limits.NUMBERS[option]


NUMERIC = list(_numeric_options())


def test_every_numeric_option_has_a_range_with_an_upper_bound():
    assert len(NUMERIC) >= 15
    for words, option, kind in NUMERIC:
        low, high, integer = _range(words, option)
        assert high < 2**53 and integer == (kind is int), (words, option)


def _outcome(argv, capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusal (a float for an int option): exit 2, one line
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.mark.parametrize("words,option,kind", NUMERIC, ids=[f"{' '.join(w)} {o}" for w, o, _ in NUMERIC])
def test_every_numeric_option_at_every_boundary(words, option, kind, tmp_path, capsys, monkeypatch):
    """Each boundary value: refused in one line naming the option (exit 2) when outside the option's range or not a
    finite number of its type; otherwise the command goes on to its sentinel. Never exit 70, never an overflow."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "empty-out").mkdir()
    argv, sentinel = _sentinel_argv(words, tmp_path)
    low, high, integer = _range(words, option)
    refused = 0
    for value in BOUNDARY:
        code, err = _outcome([*argv, f"{option}={value}"], capsys)
        number = float(value)
        fits = (not integer or value.lstrip("-").isdigit()) and number == number and abs(number) != float("inf") \
            and low <= (int(value) if integer else number) <= high \
            and not (option in limits.OPEN_LOW and number <= low)
        assert code != EXIT_BUG and not any("bug in regbench" in line for line in err), (option, value, err)
        if fits:
            assert sentinel is None or (code == 2 and sentinel in err[-1]), (option, value, code, err)
        else:
            refused += 1
            assert code == 2 and len(err) == 1 and option in err[0], (option, value, code, err)
    assert refused >= 6


RELATIONS = {
    "parallel seeds > seeds": (["--seeds", "2", "--parallel-seeds", "3"], "--parallel-seeds"),
    "train-acc-sample > train split": (["--train-acc-sample", "100000"], "--train-acc-sample"),
    "train-acc-sample > train-size": (["--train-size", "100", "--train-acc-sample", "101"], "--train-acc-sample"),
    "train-size > split": (["--train-size", "100000"], "train_size"),
    "train-size < classes": (["--train-size", "5"], "train_size"),
    "train-per-class > smallest class": (["--train-per-class", "100000"], "train_per_class"),
    "train-size with train-per-class": (["--train-size", "100", "--train-per-class", "10"], "--train-per-class"),
    "seeds repeated": (["--seeds", "1,1"], "--seeds"),
    "seed past numpy's range": (["--seeds", f"0,{2**32}"], "--seeds"),
    "seed count huge": (["--seeds", "99999999999999999999"], "--seeds"),
    "seed count 2**64": (["--seeds", str(2**64)], "--seeds"),
    "seeds negative": (["--seeds", "-3"], "--seeds"),
    "seeds a word": (["--seeds", "three"], "--seeds"),
}


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relations_between_values_are_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra, option = RELATIONS[name]
    out = tmp_path / "o"
    code, err = _outcome(["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                          "--out", str(out), "--data-dir", str(tmp_path / "data"), *extra], capsys)
    assert code == 2 and len(err) == 1 and option in err[0], (name, code, err)
    assert not out.exists()


def test_the_largest_seed_numpy_accepts_trains(tmp_path, capsys, monkeypatch):
    """The top of the seed range is real: seed 2**32-1 trains (numpy's and torch's seeding both take it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import optuna

    code, err = _outcome(["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                          "--seeds", f"{2**32 - 1},", "--quiet", "--out", str(tmp_path / "o"), "--data-dir",
                          str(tmp_path / "data")], capsys)
    assert code == 0, err
    storage = f"sqlite:///{tmp_path / 'o' / 'regbench.db'}"
    names = [s for s in optuna.get_all_study_names(storage) if s.endswith(":final")]
    [trial] = optuna.load_study(study_name=names[0], storage=storage).get_trials()
    assert trial.state.name == "COMPLETE"


# ---- environment variables: every one regbench reads × hostile values ----------------------------------------------

def _environment_reads() -> set[str]:
    """Every environment variable named in regbench's source (os.environ[...] / .get / getenv / setdefault)."""
    root = Path(__file__).resolve().parents[1]
    names = set()
    for path in [*root.glob("regbench/**/*.py"), *root.glob("datasets/**/*.py")]:
        text = path.read_text()
        consts = dict(re.findall(r'^([A-Z_]+) = "([A-Z][A-Z0-9_]+)"', text, re.M))
        for arg in re.findall(r'(?:os\.environ(?:\.get|\.setdefault)?\(|os\.environ\[|os\.getenv\()\s*([^,)\]]+)', text):
            arg = arg.strip()
            names.add(arg.strip("\"'") if arg[0] in "\"'" else consts.get(arg, arg))
    return names


def test_every_environment_variable_read_is_checked_or_listed_as_a_flag():
    read = _environment_reads()
    assert {"MLFLOW_TRACKING_URI", "REGBENCH_DATA", "REGBENCH_FAULT_AT"} <= read
    unchecked = read - set(limits.ENVIRONMENT) - set(limits.ENVIRONMENT_FLAGS)
    assert not unchecked, f"read but neither checked (limits.ENVIRONMENT) nor listed as a flag: {unchecked}"


def hostile_environment(tmp: Path) -> dict[str, list[str]]:
    afile = tmp / "afile"
    afile.write_text("x\n")
    loop = tmp / "loop"
    loop.symlink_to("loop")
    paths = [str(afile), f"{afile}/child", "/", str(tmp / "bad\x01name"), str(tmp) + "/abc" * 1100, str(loop),
             f"{UNWRITABLE}/x"]
    numbers = ["-1", "nan", "inf", "abc", "99999999999999999999", "1.5", " "]
    return {
        "MLFLOW_TRACKING_URI": ["garbage", "sqlite://", "sqlite:///", "ftp://host/x", "http://", "\x01",
                                "x" * 5000, f"sqlite:///{afile}", f"sqlite:///{afile}/child/m.db"],
        "REGBENCH_DATA": paths,
        "REGBENCH_FAULT_AT": ["bogus", "epoch:x", "epoch:0", "epoch:-1", "epoch:1:melt", "epoch:1:full",
                              "epoch:99999999999999999999", ":1"],
        "CUDA_VISIBLE_DEVICES": ["\x01", "0" * 5000],
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": numbers,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": numbers,
        "SLURM_CPUS_PER_TASK": [*numbers, "0", "100000"],
        "REGBENCH_CIFAR10_SUBSET": ["\x01", "x" * 5000],
        "SUDO_USER": ["a b", "-rf", "\x01", "x" * 40, "../etc"],
    }


BENIGN = {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/m.db", "REGBENCH_DATA": "{tmp}/data", "REGBENCH_FAULT_AT": "",
          "CUDA_VISIBLE_DEVICES": "0,1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
          "SLURM_CPUS_PER_TASK": "4", "REGBENCH_CIFAR10_SUBSET": "{tmp}/subset.npz", "SUDO_USER": "alice"}


@pytest.mark.parametrize("name", list(limits.ENVIRONMENT))
def test_every_environment_variable_with_hostile_values(name, tmp_path, capsys, monkeypatch):
    """A hostile value is one line naming the variable, exit 2, before any work; a benign one reaches the sentinel
    (an unknown method). ``run`` reads every variable here (--tracking-uri and --data-dir not given)."""
    for other in limits.ENVIRONMENT:
        monkeypatch.delenv(other, raising=False)
    argv = ["run", "--methods", "no_such_method", "--dataset", "digits", "--out", str(tmp_path / "o")]
    values = hostile_environment(tmp_path)[name]
    assert values
    for value in values:
        monkeypatch.setenv(name, value)
        code, err = _outcome(argv, capsys)
        assert code == 2 and len(err) == 1 and f"${name}" in err[0], (name, value[:40], code, err)
    monkeypatch.setenv(name, BENIGN[name].format(tmp=tmp_path))
    code, err = _outcome(argv, capsys)
    assert code == 2 and "unknown method" in err[-1], (name, err)
    assert not (tmp_path / "o").exists()
