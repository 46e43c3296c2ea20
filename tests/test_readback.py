"""Nothing regbench reads back is trusted blindly: every state-file kind × the ways it can be corrupted, generated
from the kind's schema (regbench/statefiles.py), run in process through ``regbench.cli.main``.

Each case ends as the README promises: one stderr line naming the file and exit 2, or a clean recovery (a mid-run
checkpoint of the wrong shape is ignored with one warning and the run trains again from epoch 0, ending exactly as
an uninterrupted run); never the bug handler's exit 70, never exit 0 with a wrong result, never a file created in
the current directory by a command that only reads.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from helpers import snapshot

from regbench import checkpoint, statefiles
from regbench.cli import main

EPOCHS = 3
RUN = ["--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", str(EPOCHS), "--seeds", "1",
       "--quiet"]


def call(argv, capsys):
    """(exit status, stderr's non-empty lines, stdout) of one in-process command."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, [line for line in cap.err.splitlines() if line.strip()], cap.out


def one_line_exit_2(code, err, *names):
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("regbench: error: "), err
    assert "bug in regbench" not in err[0]
    for name in names:
        assert name in err[0], (name, err[0])


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REGBENCH_FAULT_AT", raising=False)


# ---- the store pointer (OUT/store.json) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planned(tmp_path_factory, data_dir):
    """A benchmark planned in a shared SQLite store (`run --storage URL --plan-only`): OUT holds only store.json."""
    root = tmp_path_factory.mktemp("planned")
    out, store = root / "out", root / "shared.db"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        code = main(["run", *RUN, "--out", str(out), "--storage", f"sqlite:///{store}", "--plan-only", "--data-dir",
                     str(data_dir), "--name", "bench"])
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    assert code == 0
    return out, store


def _wrong(value):
    """Values of another JSON type than ``value``'s."""
    return [v for v in (5, 1.5, None, True, [], {}, "text") if type(v) is not type(value)]


def pointer_cases(good: dict) -> dict[str, bytes | str]:
    """Corruptions of a good pointer, generated from POINTER_SCHEMA: bytes to write, or a special entry."""
    text = json.dumps(good)
    cases: dict[str, bytes | str] = {
        "truncated": text[: len(text) // 2].encode(), "empty": b"", "invalid JSON": b"{storage: sqlite",
        "not UTF-8": b"\xff\xfe\x00garbage", "a JSON list": b"[1, 2]", "a JSON string": b'"sqlite:///x.db"',
        "NaN": b'{"storage": NaN, "benchmark": "bench"}', "huge": b" " * (2 << 20) + text.encode(),
        "wrong type: directory": "DIR", "symlink loop": "LOOP", "dangling symlink": "DANGLING", "fifo": "FIFO"}
    for key in statefiles.POINTER_SCHEMA:
        cases[f"missing key {key}"] = json.dumps({k: v for k, v in good.items() if k != key}).encode()
        for wrong in _wrong(good[key]):
            cases[f"{key} of type {type(wrong).__name__}"] = json.dumps({**good, key: wrong}).encode()
    cases["storage not a URL"] = json.dumps({**good, "storage": "garbage"}).encode()
    cases["storage empty"] = json.dumps({**good, "storage": ""}).encode()
    cases["benchmark not a name"] = json.dumps({**good, "benchmark": "../../etc"}).encode()
    cases["storage: a missing file"] = json.dumps({**good, "storage": "sqlite:///nowhere/missing.db"}).encode()
    cases["storage: a text file"] = "TEXTSTORE"
    cases["storage: an empty file"] = "EMPTYSTORE"
    return cases


def _write_case(path: Path, case, root: Path) -> None:
    if isinstance(case, bytes):
        path.write_bytes(case)
    elif case == "DIR":
        path.mkdir()
    elif case == "LOOP":
        path.symlink_to(path.name)
    elif case == "DANGLING":
        path.symlink_to(root / "not-there.json")
    elif case == "FIFO":
        os.mkfifo(path)
    elif case in ("TEXTSTORE", "EMPTYSTORE"):
        target = root / "not-a-store.db"
        target.write_text("" if case == "EMPTYSTORE" else "hello\n")
        path.write_text(json.dumps({"storage": f"sqlite:///{target}", "benchmark": "bench"}))


GOOD_POINTER = {"storage": "sqlite:////somewhere/shared.db", "benchmark": "bench"}


@pytest.mark.parametrize("name", list(pointer_cases(GOOD_POINTER)))
def test_a_corrupt_store_pointer_is_one_line_and_creates_nothing(name, planned, tmp_path, monkeypatch, capsys):
    out, _store = planned
    good = json.loads((out / statefiles.POINTER_FILE).read_text())
    case = pointer_cases(good)[name]
    mine = tmp_path / "out"
    mine.mkdir()
    _write_case(mine / statefiles.POINTER_FILE, case, tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    code, err, _ = call(["status", mine], capsys)
    one_line_exit_2(code, err)
    assert "store.json" in err[0] or "not-a-store.db" in err[0] or "missing.db" in err[0], err[0]
    assert list(cwd.iterdir()) == [], "a read-only command created a file in the current dir"
    assert snapshot(tmp_path) == before


def test_the_pointer_is_absolute_and_an_old_relative_one_is_read_against_out(planned, tmp_path, monkeypatch, capsys,
                                                                             data_dir):
    out, store = planned
    assert json.loads((out / statefiles.POINTER_FILE).read_text())["storage"] == f"sqlite:///{store}"
    # planned with a relative URL from one dir: the pointer written is absolute
    monkeypatch.chdir(tmp_path)
    code = main(["run", *RUN, "--out", "rel-out", "--storage", "sqlite:///rel.db", "--plan-only", "--data-dir",
                 str(data_dir), "--name", "rel"])
    capsys.readouterr()
    assert code == 0
    pointer = json.loads((tmp_path / "rel-out" / statefiles.POINTER_FILE).read_text())
    assert pointer["storage"] == f"sqlite:///{tmp_path / 'rel.db'}"
    # an old pointer holding a relative path, its store beside it in OUT: read from another dir, nothing created there
    old = tmp_path / "old-out"
    old.mkdir()
    shutil.copy(store, old / "shared.db")
    (old / statefiles.POINTER_FILE).write_text(json.dumps({"storage": "sqlite:///shared.db", "benchmark": "bench"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err, stdout = call(["status", old], capsys)
    assert code == 0, err
    assert "benchmark bench" in stdout
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("content", ["", "text", "sqlite-foreign"])
def test_read_only_commands_never_create_or_fill_a_store(content, tmp_path, monkeypatch, capsys):
    """status/report/export on a store file that is missing, empty, text or a foreign SQLite database: one line,
    and the file is left byte for byte (Optuna would have created its tables in it)."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "x.db"
    if content == "sqlite-foreign":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE mine (x)")
    else:
        db.write_text(content)
    before = db.read_bytes()
    for command in (["status", "--storage", f"sqlite:///{db}"], ["export", tmp_path / "o", "--storage",
                                                                    f"sqlite:///{db}"]):
        code, err, _ = call(command, capsys)
        one_line_exit_2(code, err)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


@pytest.mark.parametrize("command", ["launch", "worker"])
def test_launch_and_worker_never_create_a_store(command, tmp_path, monkeypatch, capsys):
    """They follow or join a planned benchmark: before, `launch --out DIR` on a DIR with no store left an empty
    Optuna database there (114 KB); a worker's --storage was already checked when parsed (kept here as a guard)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    argv = (["launch", "--name", "b", "--out", tmp_path / "o", "--workers", "1"] if command == "launch" else
            ["worker", "--name", "b", "--storage", f"sqlite:///{tmp_path / 'o' / 'new.db'}"])
    code, err, _ = call(argv, capsys)
    one_line_exit_2(code, err, "does not exist")
    assert list((tmp_path / "o").iterdir()) == []


# ---- the plan kept in the store ---------------------------------------------------------------------------------------

def spec_cases(spec: dict) -> dict:
    cases = {"not an object": "a string", "a list": [1, 2]}
    for key in statefiles.SPEC_SCHEMA:
        cases[f"missing key {key}"] = {k: v for k, v in spec.items() if k != key}
        for wrong in _wrong(spec[key]):
            cases[f"{key} of type {type(wrong).__name__}"] = {**spec, key: wrong}
    base = json.loads(spec["base"])
    cases.update({
        "seeds negative": {**spec, "seeds": [-1]}, "seed past numpy's range": {**spec, "seeds": [2**32]},
        "seed 2**64": {**spec, "seeds": [2**64]}, "seeds repeated": {**spec, "seeds": [0, 0]},
        "seed a string": {**spec, "seeds": ["0"]}, "no seeds": {**spec, "seeds": []},
        "base not JSON": {**spec, "base": "{epochs"}, "base a list": {**spec, "base": "[1]"},
        "base epochs huge": {**spec, "base": json.dumps({**base, "epochs": 10**12})},
        "base epochs 0": {**spec, "base": json.dumps({**base, "epochs": 0})},
        "base lr NaN": {**spec, "base": json.dumps({**base, "lr": float("nan")})},
        "base batch size a string": {**spec, "base": json.dumps({**base, "batch_size": "64"})},
        "base unknown field": {**spec, "base": json.dumps({**base, "colour": "red"})},
        "a method entry not an object": {**spec, "methods": {"baseline": 3}},
        "protocol unknown field": {**spec, "protocol": {**spec["protocol"], "colour": 1}},
        "benchmark renamed": {**spec, "benchmark": "../x"},
    })
    return cases


@pytest.fixture(scope="module")
def good_spec(planned):
    _out, store = planned
    storage = optuna.storages.RDBStorage(f"sqlite:///{store}")
    return optuna.load_study(study_name="bench", storage=storage).user_attrs["spec"]


@pytest.mark.parametrize("name", ["not an object", "a list", *[f"missing key {k}" for k in statefiles.SPEC_SCHEMA],
                                  "seeds negative", "seed past numpy's range", "seed 2**64", "seeds repeated",
                                  "seed a string", "no seeds", "base not JSON", "base a list", "base epochs huge",
                                  "base epochs 0", "base lr NaN", "base batch size a string", "base unknown field",
                                  "a method entry not an object", "protocol unknown field", "benchmark renamed"]
                         + [f"{k} of type {t}" for k in statefiles.SPEC_SCHEMA for t in ("int", "NoneType")])
def test_a_corrupt_plan_in_the_store_is_one_line(name, planned, good_spec, tmp_path, capsys):
    _out, store = planned
    copy = tmp_path / "shared.db"
    shutil.copy(store, copy)
    study = optuna.load_study(study_name="bench", storage=optuna.storages.RDBStorage(f"sqlite:///{copy}"))
    study.set_user_attr("spec", spec_cases(good_spec)[name])
    code, err, _ = call(["status", "--storage", f"sqlite:///{copy}", "--name", "bench"], capsys)
    one_line_exit_2(code, err, "bench")


# ---- the output dir's entries -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry,damage", [(e, d) for e in statefiles.OUTPUT_ENTRIES for d in ("wrong type", "loop")])
def test_an_output_entry_of_the_wrong_type_is_refused_before_any_work(entry, damage, tmp_path, capsys, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    path = out / entry
    if damage == "loop":
        path.symlink_to(entry)
    elif statefiles.OUTPUT_ENTRIES[entry] == statefiles.FILE:
        path.mkdir()
        (path / "inside").write_text("keep\n")
    else:
        path.write_text("keep\n")
    before = snapshot(tmp_path), sorted(os.listdir(out))
    code, err, _ = call(["run", *RUN, "--out", out, "--data-dir", data_dir], capsys)
    one_line_exit_2(code, err, entry)
    assert (snapshot(tmp_path), sorted(os.listdir(out))) == before


@pytest.mark.parametrize("damage", ["a file", "a symlink loop"])
def test_out_itself_of_the_wrong_type_is_refused(damage, tmp_path, capsys, data_dir):
    out = tmp_path / "out"
    out.write_text("keep\n") if damage == "a file" else out.symlink_to("out")
    code, err, _ = call(["run", *RUN, "--out", out, "--data-dir", data_dir], capsys)
    one_line_exit_2(code, err, "--out")


# ---- mid-run checkpoints -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(tmp_path_factory, data_dir):
    """A real run killed (SIGKILL) after its 2nd of 3 epochs, a checkpoint saved after every epoch; and the result of
    the same run uninterrupted, for comparison."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "REGBENCH_FAULT_AT": "epoch:2"}
    proc = subprocess.run([sys.executable, "-m", "regbench.cli", "run", *RUN, "--out", str(out), "--data-dir",
                           str(data_dir), "--checkpoint-every-seconds", "0"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr
    [ckpt] = list((out / "checkpoints").glob("*.pt"))
    clean = root / "clean"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert main(["run", *RUN, "--out", str(clean), "--data-dir", str(data_dir)]) == 0
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return out, ckpt, _final(clean)


def _final(out: Path) -> dict:
    """The one final run's state, history and metrics, read from the store."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'regbench.db'}")
    finals = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith(":final")]
    trials = optuna.load_study(study_name=finals[0], storage=storage).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 1, [t.state for t in trials]
    return {"history": [int(r["epoch"]) for r in done[0].user_attrs["history"]],
            "metrics": {k: v for k, v in done[0].user_attrs["metrics"].items() if "second" not in k}}


def checkpoint_cases(state: dict) -> dict:
    """Corruptions of a loaded checkpoint, generated from its fields: each field missing or of another type, and
    values that do not fit the rest (the counter, the history, the run)."""
    cases = {}
    for key in ("epoch", "step", "history", "device_type", "model", "optimizer", "scheduler", "method", "rng",
                "generators", "config_key", "format"):
        cases[f"missing {key}"] = {k: v for k, v in state.items() if k != key}
        for wrong in ("2", 2.0, None, [1]) if not isinstance(state[key], list) else ("2", None, {}):
            cases[f"{key} = {wrong!r}"] = {**state, key: wrong}
    e = state["epoch"]
    cases.update({
        "epoch counter +1": {**state, "epoch": e + 1}, "epoch counter -1": {**state, "epoch": e - 1},
        "epoch counter at the last epoch": {**state, "epoch": EPOCHS}, "epoch negative": {**state, "epoch": -1},
        "epoch 2**63": {**state, "epoch": 2**63}, "history one row short": {**state, "history": state["history"][:-1]},
        "history rows renumbered": {**state, "history": [{**r, "epoch": 7} for r in state["history"]]},
        "history row not a dict": {**state, "history": [1] * e}, "step negative": {**state, "step": -5},
        "epoch and history past the run": {**state, "epoch": EPOCHS + 1,
                                           "history": [{"epoch": i + 1} for i in range(EPOCHS + 1)]},
        "another run's": {**state, "config_key": "0" * 64}, "another format": {**state, "format": 99},
        "generators empty": {**state, "generators": {}}, "model not tensors": {**state, "model": {"w": 1}},
        "partial epoch malformed": {**state, "partial_epoch": {"batch": "x"}},
    })
    return cases


def test_every_checkpoint_corruption_is_ignored_with_one_warning(killed, tmp_path):
    """Each field-level corruption is ignored by the loader (None, one warning naming the file); every generated
    case counted."""
    _out, ckpt, _clean = killed
    state = torch.load(ckpt, weights_only=True)
    assert statefiles.checkpoint_problem(state, ckpt.stem, EPOCHS, checkpoint.FORMAT) is None  # the real one fits
    cases = checkpoint_cases(state)
    for name, bad in cases.items():
        path = tmp_path / ckpt.name
        torch.save(bad, path)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert checkpoint.load(path, ckpt.stem, torch.device("cpu"), epochs=EPOCHS) is None, name
            # resume_point (grouping only) does not know the run's epochs: that one case is load's to refuse
            assert checkpoint.resume_point(path) is None or name == "epoch and history past the run", name
        assert len(seen) == 1 and str(path) in str(seen[0].message), (name, [str(w.message) for w in seen])
    assert len(cases) >= 60


@pytest.mark.parametrize("name", ["epoch counter -1", "epoch counter at the last epoch", "history one row short",
                                  "epoch = '2'", "missing history"])
def test_a_rerun_over_a_corrupt_checkpoint_trains_again_and_ends_as_an_uninterrupted_run(name, killed, tmp_path,
                                                                                          capsys, data_dir):
    """The issue's example: a real mid-run checkpoint whose epoch field was changed was recorded COMPLETE with 1 of
    its epochs. Now it is ignored (one warning), the run starts over and ends as the uninterrupted run, every epoch."""
    out0, ckpt0, clean = killed
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    ckpt = out / "checkpoints" / ckpt0.name
    state = torch.load(ckpt, weights_only=True)
    torch.save(checkpoint_cases(state)[name], ckpt)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, err, _ = call(["run", *RUN, "--out", out, "--data-dir", data_dir], capsys)
    assert code == 0, err
    assert any("ignoring checkpoint" in str(w.message) for w in seen), [str(w.message) for w in seen]
    result = _final(out)
    assert result["history"] == list(range(1, EPOCHS + 1))
    assert result == clean


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "a list", "a directory", "a symlink loop"])
def test_an_unreadable_checkpoint_is_one_line_before_the_store_is_touched(damage, killed, tmp_path, capsys, data_dir):
    out0, ckpt0, _clean = killed
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    ckpt = out / "checkpoints" / ckpt0.name
    data = ckpt.read_bytes()
    ckpt.unlink()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x80\x04garbage" * 50)
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "a list":
        torch.save([1, 2, 3], ckpt)
    elif damage == "a directory":
        ckpt.mkdir()
    else:
        ckpt.symlink_to(ckpt.name)
    before = snapshot(out)
    code, err, _ = call(["run", *RUN, "--out", out, "--data-dir", data_dir], capsys)
    one_line_exit_2(code, err, ckpt.name)
    assert snapshot(out) == before


def test_the_recorder_refuses_complete_without_every_epoch():
    """The last guard: a run result whose history lacks a planned epoch is never recorded COMPLETE."""
    from regbench import statefiles as sf

    assert sf.history_problem([{"epoch": 1}, {"epoch": 2}, {"epoch": 3}], 3) is None
    assert sf.history_problem([{"epoch": 1}], 3)
    assert sf.history_problem([{"epoch": 1}, {"epoch": 3}, {"epoch": 4}], 3)


# ---- status: a dead worker's trial, and finished work that was once interrupted --------------------------------------

def test_status_counts_no_interrupted_run_once_its_copy_finished(killed, tmp_path, capsys, data_dir):
    """A run killed mid-training and resumed to the end: status said "1 interrupted (resumable)" with 0 remaining."""
    out0, _ckpt, _clean = killed
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    code, err, _ = call(["run", *RUN, "--out", out, "--data-dir", data_dir], capsys)
    assert code == 0, err
    code, err, stdout = call(["status", out], capsys)
    assert code == 0, err
    assert "finals 1 done" in stdout and "0 remaining" in stdout, stdout
    assert "interrupted" not in stdout, stdout


def test_status_tells_a_dead_worker_from_a_live_one(tmp_path, capsys, data_dir):
    """A trial whose worker is training shows as running; once that worker is killed (SIGKILL: no cleanup, the trial
    stays RUNNING in the store), status says its worker is dead as soon as its heartbeat is older than the grace
    period, instead of "running" until some later command notices."""
    import time

    from helpers import trial_states

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "regbench.cli", "run", "--methods", "baseline", "--dataset",
                             "digits", "--model", "mlp", "--epochs", "500", "--seeds", "1", "--quiet", "--out",
                             str(out), "--data-dir", str(data_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while "RUNNING" not in trial_states(out / "regbench.db", "digits-mlp:baseline:final"):
            assert proc.poll() is None and time.time() < deadline, "the run never started its trial"
            time.sleep(0.5)
        time.sleep(1)  # its first heartbeat is written as the trial starts
        code, err, stdout = call(["status", out], capsys)
        assert code == 0, err
        assert "1 running" in stdout and "dead worker" not in stdout, stdout
    finally:
        proc.kill()
        proc.wait()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'regbench.db'}")
    study = optuna.load_study(study_name="digits-mlp", storage=storage)
    study.set_user_attr("spec", {**study.user_attrs["spec"], "heartbeat": {"interval": 1, "grace": 2}})
    time.sleep(3)
    code, err, stdout = call(["status", out], capsys)
    assert code == 0, err
    assert "0 running, 1 on a dead worker (no heartbeat for" in stdout, stdout
