"""Many workers (issues 6, 22): 4 `regbench worker` processes on a real PostgreSQL finish a sweep with every run done
once and `--trials` distinct configurations per tuning study; `regbench launch` starts workers through submitit and
exits cleanly; the benchmark is `--name` in every command. Skipped only where no PostgreSQL can be started (never in CI:
.ci/run sets REGBENCH_REQUIRE_SERVICES, and then a missing server fails the test)."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
from helpers import regbench_cli
from optuna.trial import TrialState
from test_protocol import check_sweep, trials, tune_study

PLAN = ["--methods", "ses,shade", "--trials", "6", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
        "--epochs", "1", "--train-size", "300", "--quiet", "--pruner", "none", "--no-tune-shared", "--untuned",
        "baseline"]


def test_four_workers_on_postgresql_do_every_run_once_and_distinct_tuning(tmp_path, postgres_url):
    """Before issue 22 every worker drew TPE's start-up points from seed 0 and tuning trials had no duplicate check:
    in this sweep the 6 trials of a method bought 2-3 configurations (measured), not 6."""
    name = f"w4-{uuid.uuid4().hex[:8]}"
    planned = regbench_cli("run", *PLAN, "--storage", postgres_url, "--name", name, "--out", str(tmp_path / "out"),
                           "--plan-only", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert not [n for n in optuna.get_all_study_names(postgres_url) if n.startswith(f"{name}:")]  # nothing ran yet
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.perf_counter()
    procs = [subprocess.Popen([str(script), "worker", "--storage", postgres_url, "--name", name, "--quiet"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=900) for p in procs]
    elapsed = time.perf_counter() - started
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert "has no work left" in stdout
    print(f"4 workers finished {name} in {elapsed:.1f} s")
    # 6 + 2 (ses) + 6 + 2 (shade) + 2 (baseline) = 18 runs, each exactly once
    check_sweep(postgres_url, name, ["baseline", "ses", "shade"], 6, [0, 1])
    workers = set()
    for method in ("ses", "shade"):
        tune = trials(postgres_url, tune_study(postgres_url, name, method))
        trained = [t for t in tune if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len({t.user_attrs["config_key"] for t in trained}) == len(trained) == 6, method
        workers |= {t.user_attrs["env"]["worker"] for t in trained}
        for t in tune:  # skipped claims (a duplicate, the budget already spent) say why and never trained
            if t.state == TrialState.FAIL:
                assert t.user_attrs["fail_reason"].startswith("skipped:") and "metrics" not in t.user_attrs
    for method in ("baseline", "ses", "shade"):
        assert all(t.state != TrialState.FAIL or t.user_attrs.get("fail_reason")
                   for t in trials(postgres_url, f"{name}:{method}:final"))
    assert len(workers) >= 2  # the work was shared (each worker records its host:pid)

    # status and report find the shared store from the planned OUT alone (OUT/store.json), or from --storage
    for where in (["status", str(tmp_path / "out")], ["status", "--storage", postgres_url, "--name", name]):
        status = regbench_cli(*where, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("0 remaining") == 3
    report = regbench_cli("report", str(tmp_path / "out"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    for method in ("baseline", "ses", "shade"):
        assert f"| {method} | 2 |" in report.stdout
    assert f"Leaderboard: {(tmp_path / 'out' / 'leaderboard.md').resolve()}" in report.stdout


def test_launch_starts_workers_through_submitit_and_writes_the_leaderboard(tmp_path):
    out = tmp_path / "out"
    store = f"sqlite:///{out / 'regbench.db'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "launched", "--out", str(out), "--plan-only",
            "--no-tune-shared", "--untuned", "baseline"]
    planned = regbench_cli("run", *plan, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    launched = regbench_cli("launch", "--name", "launched", "--workers", "2", "--out", str(out), cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr
    assert "Exception ignored" not in launched.stderr and "Traceback" not in launched.stderr, launched.stderr
    assert "launched 2 workers (local)" in launched.stdout
    assert "| shade | 2 |" in launched.stdout and (out / "leaderboard.md").is_file()
    check_sweep(store, "launched", ["baseline", "shade"], 2, [0, 1])
    assert len(list((out / "workers").glob("*_log.out"))) == 2  # submitit's per-job logs
    # the workers mirrored to the MLflow store the plan recorded (OUT/mlflow.db), racing for its first use without a
    # false "unreachable" warning (a SQLite MLflow store migrated by two processes at once broke in 3 of 3 launches)
    logs = "".join(p.read_text() for p in (out / "workers").glob("*_log.err"))
    assert "unreachable" not in logs, logs
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("launched").experiment_id])
    assert sorted(r.data.tags.get("regbench.kind", "parent") for r in runs) == ["final"] * 4 + ["parent"] * 2 + [
        "tune"] * 2


def test_launch_of_a_benchmark_that_does_not_exist(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    optuna.create_study(study_name="other", storage=f"sqlite:///{out / 's.db'}")  # a store without that benchmark
    res = regbench_cli("launch", "--name", "ghost", "--workers", "2", "--storage", f"sqlite:///{out / 's.db'}",
                       "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2 and "benchmark 'ghost' does not exist" in res.stderr
    assert not (out / "workers").exists()


def test_two_workers_share_a_journal_file_storage(tmp_path):
    journal = f"journal:{tmp_path / 'bench.log'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "jr", "--out", str(tmp_path / "out"),
            "--storage", journal, "--plan-only", "--no-tune-shared", "--untuned", "baseline"]
    assert regbench_cli("run", *plan, cwd=tmp_path).returncode == 0
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the second worker uses the old spelling --benchmark: it still works, with one deprecation line
    procs = [subprocess.Popen([str(script), "worker", "--storage", journal, spelling, "jr", "--quiet"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for spelling in ("--name", "--benchmark")]
    errs = []
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        errs.append(stderr)
    assert "deprecated" not in errs[0] and errs[1].count("`worker --benchmark NAME` is deprecated; use `worker --name "
                                                        "NAME`") == 1, errs
    # MLFLOW_TRACKING_URI unset: the workers mirror to where the plan's run recorded (its OUT/mlflow.db), silently
    assert not any("unreachable" in e or "not mirrored" in e for e in errs), errs
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    kinds = [r.data.tags.get("regbench.kind") for r in client.search_runs(
        [client.get_experiment_by_name("jr").experiment_id])]
    assert kinds.count("tune") == 2 and kinds.count("final") == 4, kinds
    from regbench.store import open_storage
    check_sweep(open_storage(journal), "jr", ["baseline", "shade"], 2, [0, 1])


def test_worker_per_gpu_starts_n_workers_that_share_the_work(tmp_path):
    """`regbench worker --per-gpu 2` on a machine without CUDA: two child workers on the CPU, every run once."""
    journal = f"journal:{tmp_path / 'bench.log'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "pg", "--out", str(tmp_path / "out"),
            "--storage", journal, "--plan-only", "--no-tune-shared", "--untuned", "baseline"]
    assert regbench_cli("run", *plan, cwd=tmp_path).returncode == 0
    done = regbench_cli("worker", "--storage", journal, "--name", "pg", "--quiet", "--per-gpu", "2",
                        cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # each child says so when it finds no work left: two children, two lines
    assert done.stdout.count("worker: benchmark 'pg' has no work left") == 2, done.stdout
    from regbench.store import open_storage
    storage = open_storage(journal)
    check_sweep(storage, "pg", ["baseline", "shade"], 2, [0, 1])


def test_worker_per_gpu_bad_value_and_missing_benchmark_are_one_line(tmp_path):
    journal = f"journal:{tmp_path / 'bench.log'}"
    from regbench.store import open_storage
    optuna.create_study(study_name="other", storage=open_storage(journal))  # a store without those benchmarks
    bad = regbench_cli("worker", "--storage", journal, "--name", "x", "--per-gpu", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "regbench: error: --per-gpu 0 is outside 1..256; pass a value in that range"
    missing = regbench_cli("worker", "--storage", journal, "--name", "nope", "--per-gpu", "3", cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "benchmark 'nope' does not exist" in missing.stderr
