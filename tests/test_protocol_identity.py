"""A benchmark's name binds its protocol: a rerun that changes the stored spec is refused before any work; with
--supersede the old plan's queued runs are never trained and no leaderboard, budget column, export, status line or
MLflow parent counts the old plan's runs; extending (more seeds) stays allowed. Real tiny runs (digits + mlp), a real
SQLite store and MLflow store, a real Ctrl-C."""
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
from helpers import snapshot, trial_states, with_ctrl_c

from regbench.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "regbench.db"
FIRST = ["--methods", "shade", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--seeds", "2", "--name", "B",
         "--quiet"]
CHANGED = [*FIRST, "--epochs", "1", "--train-size", "600"]  # the later --epochs wins


def run_main(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def all_trials(storage: str) -> dict[str, list]:
    return {name: optuna.load_study(study_name=name, storage=storage).get_trials()
            for name in optuna.get_all_study_names(storage)}


def epochs_of(t) -> int:
    return json.loads(t.user_attrs["config"])["epochs"]


def stopped_after_first_run(out: Path) -> None:
    """`regbench run` (the 2-epoch recipe), stopped with Ctrl-C once its first final run is in the store."""
    script = Path(sys.executable).parent / "regbench"
    proc = subprocess.Popen([str(script), "run", *FIRST, "--out", str(out)], preexec_fn=with_ctrl_c,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while "COMPLETE" not in trial_states(out / "regbench.db", "B:baseline:final") and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err


def test_changed_recipe_is_refused_then_superseded_without_training_the_old_plan(tmp_path):
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'regbench.db'}"
    stopped_after_first_run(out)
    before = all_trials(storage)
    old_done = {t.user_attrs["config_key"] for ts in before.values() for t in ts if t.state.name == "COMPLETE"}
    old_queued = sum(t.state.name == "WAITING" for ts in before.values() for t in ts)
    assert old_done and old_queued, before  # the old plan left finished and queued runs

    # The same name with another recipe: refused before any work, one line naming each change and the ways on.
    files = snapshot(out)
    code, _, err = run_main("run", *CHANGED, "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "epochs 2 → 1" in err and "train_size none → 600" in err and "data split" in err
    assert "new --name" in err and "--supersede" in err
    assert snapshot(out) == files

    # --supersede: the old plan's queued runs are cancelled (never trained) and it says what it superseded.
    code, stdout, err = run_main("run", *CHANGED, "--out", str(out), "--supersede")
    assert code == 0, err
    assert f"{old_queued} queued run{'s' if old_queued > 1 else ''} cancelled (never trained)" in err, err
    assert "kept in the store but excluded" in err
    after = all_trials(storage)
    trained_after = [t for ts in after.values() for t in ts if t.state.name == "COMPLETE"
                     and t.user_attrs["config_key"] not in old_done]
    assert trained_after and all(epochs_of(t) == 1 for t in trained_after)  # nothing of the old plan trained
    cancelled = [t for ts in after.values() for t in ts if t.user_attrs.get("fail_reason", "").startswith(
        "superseded:")]
    assert len(cancelled) == old_queued and all("metrics" not in t.user_attrs for t in cancelled)
    spec = optuna.load_study(study_name="B", storage=storage).user_attrs["spec"]
    assert spec["plan"] == 1 and spec["superseded"][0]["cancelled"] == old_queued

    # The leaderboard and its budget column count the new plan only: 2 seeds x 1 epoch for every method.
    for method in ("baseline", "shade"):
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {method} |"))
        assert row.startswith(f"| {method} | 2 |") and row.rstrip(" |").split("; ")[-1].startswith("2 epochs,"), row
    # The export and the status lines too.
    assert run_main("export", str(out))[0] == 0
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 4 and set(frame.epochs) == {1}
    code, status, _ = run_main("status", str(out))
    assert code == 0 and status.count("finals 2 done, 0 running, 0 failed, 0 remaining") == 2, status
    assert "  plan 0 superseded " in status and f"{old_queued} run{'s' if old_queued > 1 else ''} queued then " \
        "cancelled" in status, status

    # MLflow: the old plan's runs are tagged and out of every parent; each parent holds the new plan's 2 seeds.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("B")
    active = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.data.tags["regbench.parent"]: r.info.run_id for r in active if "regbench.parent" in r.data.tags}
    assert set(parents) == {"baseline", "shade"}
    for method, run_id in parents.items():
        children = [r for r in active if r.data.tags.get("mlflow.parentRunId") == run_id]
        assert len(children) == 2 and {r.data.params["epochs"] for r in children} == {"1"}, method
    retired = [r for r in client.search_runs([exp.experiment_id], run_view_type=3, max_results=1000)
               if r.info.lifecycle_stage == "deleted"]
    assert retired and all(r.data.tags["regbench.superseded"] == "plan 0 superseded by plan 1" for r in retired)

    # Extending stays allowed and says so; fewer seeds is a change.
    code, _, err = run_main("run", *CHANGED, "--seeds", "3", "--out", str(out), "--plan-only")
    assert code == 0 and "extending benchmark 'B' (same protocol): seeds 2 added" in err, err
    code, _, err = run_main("run", *CHANGED, "--seeds", "2", "--out", str(out), "--plan-only")
    assert code == 2 and "seeds 0,1,2 → 0,1" in err, err


def test_a_store_written_before_the_check_keeps_its_protocol(tmp_path):
    """The fixture's spec predates the plan number and the new tuning fields: the same command is no change (its tuning
    studies keep their names), another recipe is refused."""
    out = tmp_path / "tiny"
    out.mkdir()
    shutil.copy(FIXTURE, out / "regbench.db")
    storage = f"sqlite:///{out / 'regbench.db'}"
    spec = optuna.load_study(study_name="tiny-400", storage=storage).user_attrs["spec"]
    assert "plan" not in spec and "untuned" not in spec["protocol"]
    same = ["run", "--methods", "ses,shade", "--epochs", "3", "--seeds", "3", "--train-size", "400", "--name",
            "tiny-400", "--out", str(out), "--quiet", "--plan-only"]
    files = snapshot(out)
    code, _, err = run_main(*same[:-1], "--epochs", "2", same[-1])
    assert code == 2 and "epochs 3 → 2" in err and snapshot(out) == files, err
    code, _, err = run_main(*same)
    assert code == 0 and "another protocol" not in err, err
    again = optuna.load_study(study_name="tiny-400", storage=storage).user_attrs["spec"]
    assert "plan" not in again
    assert {m: i["ident"] for m, i in again["methods"].items()} == {m: i["ident"] for m, i in spec["methods"].items()}


def test_a_worker_holding_a_superseded_plan_stops_before_claiming(tmp_path):
    """A worker that loaded plan 0 claims nothing once the store holds plan 1: it stops with one line saying why."""
    import pytest

    from regbench import protocol, runner
    from regbench.config import RunConfig
    from regbench.errors import RegbenchError
    from regbench.store import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=1)
    old = protocol.Benchmark(name="W", base=base, fixed={"baseline": {}}, seeds=[0])
    protocol.save_spec(storage, old)
    new = protocol.Benchmark(name="W", base=base.replace(epochs=2), fixed={"baseline": {}}, seeds=[0], plan=1)
    protocol.save_spec(storage, new)
    with pytest.raises(RegbenchError, match="superseded by plan 1 .* start the worker again to join plan 1"):
        runner.Runner(storage, old, splits=None, wait=False).run()
    assert optuna.get_all_study_names(storage) == ["W"]  # nothing claimed, no final study created
