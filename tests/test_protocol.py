"""The protocol (issue 6): tuning under one budget on validation, selection, finals over shared seeds, resume after a
SIGKILL, diverging trials, status, and bad input. Real training (digits + mlp, tiny), real SQLite stores."""
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from helpers import regbench_cli, running_epochs, snapshot
from optuna.trial import TrialState

from regbench import registry
from regbench.cli import STOPPING, main
from regbench.record import spent

FAST = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--quiet"]
# Baseline at its defaults and lr / weight decay at the recipe's (fair tuning, the default, tunes them for every arm:
# tests/test_fair_tuning.py), so the runs of a test about something else stay as few as it needs.
UNTUNED_BASELINE = ["--no-tune-shared", "--untuned", "baseline"]


def run_main(*args):
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def storage_of(out: Path) -> str:
    return f"sqlite:///{out / 'regbench.db'}"


def trials(storage: str, name: str):
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:
        return []


def study_names(storage: str) -> list[str]:
    return optuna.get_all_study_names(storage)


def tune_study(storage: str, bench: str, method: str) -> str:
    [name] = [n for n in study_names(storage) if n.startswith(f"{bench}:{method}:tune:")]
    return name


def check_sweep(storage: str, bench: str, methods: list[str], n_trials: int, seeds: list[int]) -> None:
    """Every tuned method spent exactly its budget; every method has each seed's final run exactly once, from its
    selected configuration; skipped trials never trained."""
    root = optuna.load_study(study_name=bench, storage=storage)
    for method in methods:
        if method != "baseline" and n_trials:
            tune = trials(storage, tune_study(storage, bench, method))
            # Budget: every trial that trained (complete, pruned or diverged); interrupted ones were retried and
            # skipped ones never trained.
            counted = [t for t in tune if t.state != TrialState.FAIL
                       or str(t.user_attrs.get("fail_reason", "")).startswith("diverged")]
            assert len(counted) == n_trials, (method, [(t.number, t.state, t.user_attrs.get("fail_reason"))
                                                       for t in tune])
            assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in tune)
            for t in tune:
                if t.state == TrialState.FAIL and not t.user_attrs.get("fail_reason", "").startswith(
                        ("diverged", "skipped")):  # interrupted → retried once with the same params
                    retries = [r for r in tune if r.system_attrs.get("failed_trial") == t.number]
                    assert len(retries) <= 1 and all(r.params == t.params for r in retries)
        selected = [v for k, v in root.user_attrs.items() if k.startswith(f"selected:{method}:")]
        assert len(selected) == 1
        finals = [t for t in trials(storage, f"{bench}:{method}:final")
                  if t.state == TrialState.COMPLETE and t.user_attrs["group_key"] == selected[0]["group_key"]]
        assert sorted(t.user_attrs["seed"] for t in finals) == seeds, method
        assert len({t.user_attrs["config_key"] for t in finals}) == len(finals)  # none done twice
        for t in trials(storage, f"{bench}:{method}:final"):
            if str(t.user_attrs.get("fail_reason", "")).startswith("skipped:"):
                assert "metrics" not in t.user_attrs


def test_tuning_selects_on_validation_and_reruns_the_best_over_shared_seeds(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_main("run", "--methods", "ses", "--trials", "3", "--seeds", "2", "--out", str(out), *FAST,
                               *UNTUNED_BASELINE)
    assert code == 0
    storage = storage_of(out)
    assert not [n for n in study_names(storage) if n.startswith("digits-mlp:baseline:tune")]  # nothing to tune
    tune = trials(storage, tune_study(storage, "digits-mlp", "ses"))
    assert len(tune) == 3
    for t in tune:
        assert "test_acc" not in t.user_attrs.get("metrics", {})  # test is never read while tuning
        assert sorted(t.intermediate_values) == [1, 2]           # per-epoch validation reports feed the pruner
        assert json.loads(t.user_attrs["config"])["seed"] == 10_000
    complete = [t for t in tune if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert best.value == best.user_attrs["metrics"]["val_acc"]
    finals = [t for t in trials(storage, "digits-mlp:ses:final") if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in finals) == [0, 1]
    best_hp = json.loads(best.user_attrs["config"])["hparams"]
    assert all(json.loads(t.user_attrs["config"])["hparams"] == best_hp for t in finals)
    base_seeds = sorted(t.user_attrs["seed"] for t in trials(storage, "digits-mlp:baseline:final"))
    assert base_seeds == [0, 1]  # paired with ses
    row = next(line for line in stdout.splitlines() if line.startswith("| ses |"))
    assert f"beta={best_hp['beta']:.3g}" in row and "3 tuning trials" in row
    expected_epochs = sum(spent([t])["epochs"] for t in tune) + 2 * 2
    assert f"{expected_epochs} epochs" in row
    assert "objective `val_acc` on the validation split" in stdout

    again = regbench_cli("run", "--methods", "ses", "--trials", "3", "--seeds", "2", "--out", str(out), *FAST,
                         *UNTUNED_BASELINE, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(trials(storage, tune_study(storage, "digits-mlp", "ses"))) == 3  # resumed: nothing new
    assert len(trials(storage, "digits-mlp:ses:final")) == 2

    status = regbench_cli("status", str(out), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"ses: tuning {len(complete)} done" in status.stdout
    assert "baseline: untuned on purpose (--untuned)" in status.stdout
    assert "0 trials remaining" in status.stdout and "finals 2 done, 0 running, 0 failed, 0 remaining" in status.stdout


def test_epoch_budget_and_set_values_are_respected(tmp_path):
    out = tmp_path / "out"
    code, _, _ = run_main("run", "--methods", "ses", "--budget-epochs", "5", "--seeds", "1", "--set",
                               "ses.beta=0.5", "--pruner", "none", "--out", str(out), *FAST, *UNTUNED_BASELINE)
    assert code == 0
    tune = trials(storage_of(out), tune_study(storage_of(out), "digits-mlp", "ses"))
    assert len(tune) == 3 and spent(tune)["epochs"] == 6  # 2 + 2 < 5, so a third trial started, then none
    for t in tune:
        assert "beta" not in t.params                          # fixed by --set: not searched
        assert json.loads(t.user_attrs["config"])["hparams"]["beta"] == 0.5


def test_tune_shared_tunes_lr_and_weight_decay_for_baseline_too(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_main("run", "--methods", "shade", "--trials", "2", "--seeds", "1", "--tune-shared",
                               "--out", str(out), *FAST)
    assert code == 0
    base = trials(storage_of(out), tune_study(storage_of(out), "digits-mlp", "baseline"))
    assert len(base) == 2 and set(base[0].params) == {"shared.lr", "shared.weight_decay"}
    for t in base:
        cfg = json.loads(t.user_attrs["config"])
        assert cfg["lr"] == t.params["shared.lr"] and cfg["weight_decay"] == t.params["shared.weight_decay"]
    row = next(line for line in stdout.splitlines() if line.startswith("| baseline |"))
    assert "lr=" in row and "weight_decay=" in row


UNSTABLE = '''
import torch
from regbench.methods.base import Method


class Unstable(Method):
    """Test plugin: its loss is NaN whenever blowup is on (a stand-in for a regularizer that diverges)."""
    name = "toy_unstable"
    description = "test plugin: NaN loss when blowup=True"
    defaults = {"blowup": False, "weight": 1e-3}

    @classmethod
    def search_space(cls, trial):
        return {"blowup": trial.suggest_categorical("blowup", [False, True]),
                "weight": trial.suggest_float("weight", 1e-4, 1e-2, log=True)}

    def loss(self, step):
        term = self.hparams["weight"] * step.logits.float().pow(2).mean()
        return term * float("nan") if self.hparams["blowup"] else term


class BadSpace(Method):
    """Test plugin: a search space that reaches values its own validation refuses."""
    name = "toy_bad_space"
    description = "test plugin: weight searched over [-1, 1] but must be >= 0"
    defaults = {"weight": 0.1}

    @classmethod
    def validate(cls, hp):
        from regbench.methods.base import check_range
        check_range("toy_bad_space", "weight", hp["weight"], 0)

    @classmethod
    def search_space(cls, trial):
        return {"weight": trial.suggest_float("weight", -1.0, 1.0)}
'''


@pytest.fixture
def unstable_plugin(tmp_path, monkeypatch):
    """A real installed-style plugin (module + dist-info with an entry point) on sys.path and PYTHONPATH."""
    site = tmp_path / "site"
    (site / "toy_unstable-0.0.1.dist-info").mkdir(parents=True)
    (site / "regbench_toy_unstable.py").write_text(textwrap.dedent(UNSTABLE))
    (site / "toy_unstable-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toy-unstable\nVersion: 0.0.1\n")
    (site / "toy_unstable-0.0.1.dist-info" / "entry_points.txt").write_text(
        "[regbench.methods]\ntoy_unstable = regbench_toy_unstable:Unstable\n"
        "toy_bad_space = regbench_toy_unstable:BadSpace\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    registry._group.cache_clear()
    yield site
    registry._group.cache_clear()


def test_diverging_trials_fail_with_their_reason_and_the_sweep_completes(tmp_path, unstable_plugin):
    out = tmp_path / "out"
    code, stdout, err = run_main("run", "--methods", "toy_unstable", "--trials", "6", "--seeds", "2",
                                 "--pruner", "none", "--out", str(out), *FAST, *UNTUNED_BASELINE)
    assert code == 0, err
    storage = storage_of(out)
    tune = trials(storage, tune_study(storage, "digits-mlp", "toy_unstable"))
    assert len(tune) == 6
    blown = [t for t in tune if t.params["blowup"]]
    assert blown, "TPE's random start drew no blowup=True; change the sampler seed of this test"
    for t in tune:
        if t.params["blowup"]:
            assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith("diverged: non-finite loss")
        else:
            assert t.state == TrialState.COMPLETE
    finals = [t for t in trials(storage, "digits-mlp:toy_unstable:final") if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in finals) == [0, 1]
    assert all(json.loads(t.user_attrs["config"])["hparams"]["blowup"] is False for t in finals)
    assert "| toy_unstable | 2 |" in stdout and "6 tuning trials" in stdout

    # MLflow mirrors every trial: tuning trials as children tagged with their state, the parent holds the selection
    # and the tuning curve.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("digits-mlp")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("regbench.method") == "toy_unstable"
                and "regbench.parent" not in r.data.tags]
    tuned = [r for r in children if r.data.tags["regbench.kind"] == "tune"]
    assert len(tuned) == 6 and len([r for r in children if r.data.tags["regbench.kind"] == "final"]) == 2
    failed = [r for r in tuned if r.data.tags["regbench.state"] == "fail"]
    assert len(failed) == len(blown) and all(r.info.status == "FAILED" for r in failed)
    assert all(r.data.tags["regbench.fail_reason"].startswith("diverged") for r in failed)
    [parent] = [r for r in runs if r.data.tags.get("regbench.parent") == "toy_unstable"]
    assert parent.data.params["selected.blowup"] == "False"
    curve = client.get_metric_history(parent.info.run_id, "tuning/value")
    assert len(curve) == 6 - len(blown)


SWEEP = ["run", "--methods", "ses,shade", "--trials", "3", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
         "--epochs", "2", "--quiet", "--pruner", "none",
         *UNTUNED_BASELINE]  # 3 + 2 (ses) + 3 + 2 (shade) + 2 (baseline) = 12 runs


def started_runs(out: Path) -> int:
    """How many trials of any study of the store have started (running or finished), 0 while it is being created.
    Read-only: opening the store with Optuna while the run under test creates its schema would race it."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{out / 'regbench.db'}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state != 'WAITING'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_sigkill_at_a_random_moment_then_rerun_gives_every_run_exactly_once(tmp_path):
    out = tmp_path / "out"
    args = [*SWEEP, "--out", str(out)]
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    seed = int(os.environ.get("REGBENCH_KILL_SEED", time.time_ns() % 10_000))
    # A random moment measured in progress, not seconds (so a fast machine cannot finish first): once the k-th of the
    # 12 runs has started, plus a random fraction of a second — mid-training, or between runs.
    rng = random.Random(seed)
    k, extra = rng.randint(1, 11), rng.uniform(0.0, 0.8)
    proc = subprocess.Popen([str(script), *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and started_runs(out) < k and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    where = f"kill seed {seed}: after run {k} started + {extra:.2f} s"
    assert proc.wait() == -signal.SIGKILL, f"the sweep ended before the kill ({where})"
    again = regbench_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, f"{where}: {again.stderr}"
    check_sweep(storage_of(out), "digits-mlp", ["baseline", "ses", "shade"], 3, [0, 1])
    for method in ("baseline", "ses", "shade"):
        assert f"| {method} | 2 |" in again.stdout, where


def test_sigkill_during_a_tuning_trial_retries_it_once_with_the_same_params(tmp_path):
    out = tmp_path / "out"
    args = [*SWEEP, "--methods", "ses", "--out", str(out)]
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(script), *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    storage, deadline, running = storage_of(out), time.time() + 300, []
    while time.time() < deadline and not running:
        time.sleep(0.1)
        # Polled read-only: opening the store with Optuna while the run creates its schema races on CREATE TABLE.
        # Waits for tuning trial 1 to have its params drawn: a kill before that leaves nothing for the retry to copy.
        try:
            with sqlite3.connect(f"file:{out / 'regbench.db'}?mode=ro", uri=True) as con:
                running = con.execute(
                    "SELECT t.trial_id FROM trials t JOIN studies s USING (study_id) WHERE s.study_name LIKE "
                    "'%:ses:tune:%' AND t.number = 1 AND t.state = 'RUNNING' AND EXISTS "
                    "(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id)").fetchall()
        except sqlite3.Error:  # not created yet
            continue
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and running, stderr
    again = regbench_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    check_sweep(storage, "digits-mlp", ["baseline", "ses"], 3, [0, 1])
    tune = trials(storage, tune_study(storage, "digits-mlp", "ses"))
    [dead] = [t for t in tune if t.number == 1]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"].startswith("interrupted")
    [retry] = [t for t in tune if t.system_attrs.get("failed_trial") == 1]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert "fail_reason" not in retry.user_attrs


@pytest.mark.parametrize("args, expected", [
    (["--trials", "-1"], "--trials -1 is outside 0..1000000"),
    (["--seeds", "0"], "--seeds 0 is read as a count"),
    (["--budget-epochs", "0"], "--budget-epochs 0 is outside 1..1000000000"),
    (["--methods", "toy_bad_space", "--trials", "2"],
     "the search space of 'toy_bad_space' yields an invalid hparam (toy_bad_space.weight="),
])
def test_protocol_bad_input_is_one_line_exit_2_and_the_store_is_unchanged(args, expected, tmp_path,
                                                                           unstable_plugin):
    out = tmp_path / "out"
    assert run_main("run", "--methods", "ses", "--seeds", "1", "--out", str(out), *FAST)[0] == 0
    before = snapshot(out)
    code, _, err = run_main("run", "--methods", "ses", "--out", str(out), *FAST, *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before


def test_worker_for_a_missing_benchmark_and_unreachable_storage(tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="other", storage=store)  # a store that holds another benchmark
    missing = regbench_cli("worker", "--storage", store, "--name", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "benchmark 'nope' does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    dead = regbench_cli("worker", "--storage", "postgresql://nobody@127.0.0.1:1/none", "--benchmark", "x",
                        cwd=tmp_path)
    assert dead.returncode == 2 and "cannot open storage" in dead.stderr and "Traceback" not in dead.stderr


def test_sigterm_stops_with_143_and_one_line_then_the_rerun_finishes(tmp_path):
    out = tmp_path / "out"
    # Epochs long enough that the signal lands inside the training loop (a stop after the loop's last step check lets
    # the trial finish: test_interrupts.py), with 7 of 8 epochs still to go once the first one is reported.
    args = [*SWEEP, "--methods", "shade", "--trials", "0", "--epochs", "8", "--batch-size", "8", "--out", str(out)]
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(script), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage, deadline, running = storage_of(out), time.time() + 300, False
    while time.time() < deadline and not running and proc.poll() is None:
        time.sleep(0.05)
        running = running_epochs(out / "regbench.db", "digits-mlp:shade:final") >= 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert running and proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("regbench: terminated (SIGTERM); rerun the same command to resume "
                                               "where it stopped")
    assert STOPPING[True].strip() in stderr.splitlines()  # acknowledged, then stopped after the step
    finals = trials(storage, "digits-mlp:shade:final")
    [stopped] = [t for t in finals if t.state == TrialState.FAIL]
    [resume] = [t for t in finals if t.state == TrialState.WAITING and t.user_attrs.get("resumes_trial") ==
                stopped.number]
    assert stopped.user_attrs["fail_reason"].startswith("interrupted: stopped by a signal (Ctrl-C, SIGTERM, or a scheduler's time-limit warning) after epoch ")
    assert resume.user_attrs["config_key"] == stopped.user_attrs["config_key"]
    status = regbench_cli("status", str(out), cwd=tmp_path)
    assert "0 failed, 1 interrupted (resumable, not failed)" in status.stdout, status.stdout
    again = regbench_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    check_sweep(storage, "digits-mlp", ["baseline", "shade"], 0, [0, 1])
    [resumed] = [t for t in trials(storage, "digits-mlp:shade:final") if t.number == resume.number]
    assert resumed.state == TrialState.COMPLETE and resumed.user_attrs["seed"] == 0
    configured = {"method": "shade", **json.loads(stopped.user_attrs["config"])["hparams"]}
    assert resumed.params == stopped.params == configured  # its fixed configuration; the seed is no param


def test_oracle_table_is_written_only_on_request_and_labelled(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_main("run", "--methods", "shade", "--trials", "2", "--seeds", "1", "--oracle",
                               "--pruner", "none", "--out", str(out), *FAST)
    assert code == 0
    tune = trials(storage_of(out), tune_study(storage_of(out), "digits-mlp", "shade"))
    best_on_test = max(t.user_attrs["metrics"]["test_acc"] for t in tune)
    assert "ORACLE (selected on test" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| shade |") and "ORACLE" not in line
               and line.count("|") == 5)
    assert f"{best_on_test * 100:.2f}" in row
    code, plain, _ = run_main("run", "--methods", "shade", "--trials", "2", "--seeds", "1", "--pruner", "none",
                              "--out", str(tmp_path / "plain"), *FAST)
    assert code == 0 and "ORACLE" not in plain
    plain_tune = trials(storage_of(tmp_path / "plain"), tune_study(storage_of(tmp_path / "plain"), "digits-mlp",
                                                                     "shade"))
    assert all("test_acc" not in t.user_attrs["metrics"] for t in plain_tune)
