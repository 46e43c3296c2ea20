"""Many workers (issue 6): 4 `regbench worker` processes on a real PostgreSQL finish a sweep with every run done once;
`regbench launch` starts workers through submitit. Skipped only where no PostgreSQL can be started (never in CI:
.ci/run sets REGBENCH_REQUIRE_SERVICES, and then a missing server fails the test)."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
from helpers import regbench_cli
from test_protocol import check_sweep, trials

PLAN = ["--methods", "ses,shade", "--trials", "3", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
        "--epochs", "1", "--quiet", "--pruner", "none"]


def test_four_workers_on_postgresql_do_every_run_once(tmp_path, postgres_url):
    name = f"w4-{uuid.uuid4().hex[:8]}"
    planned = regbench_cli("run", *PLAN, "--storage", postgres_url, "--name", name, "--out", str(tmp_path / "out"),
                           "--plan-only", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert not [n for n in optuna.get_all_study_names(postgres_url) if n.startswith(f"{name}:")]  # nothing ran yet
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.perf_counter()
    procs = [subprocess.Popen([str(script), "worker", "--storage", postgres_url, "--benchmark", name, "--quiet"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=900) for p in procs]
    elapsed = time.perf_counter() - started
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert "has no work left" in stdout
    print(f"4 workers finished {name} in {elapsed:.1f} s")
    # 3 + 2 (ses) + 3 + 2 (shade) + 2 (baseline) = 12 runs, each exactly once
    check_sweep(postgres_url, name, ["baseline", "ses", "shade"], 3, [0, 1])
    ran_by = {t.user_attrs.get("env", {}).get("platform") for t in trials(postgres_url, f"{name}:ses:final")}
    assert ran_by  # provenance recorded by whichever worker ran it

    status = regbench_cli("status", "--storage", postgres_url, "--name", name, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("0 remaining") == 3
    report = regbench_cli("report", str(tmp_path / "out"), "--storage", postgres_url, "--name", name, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    for method in ("baseline", "ses", "shade"):
        assert f"| {method} | 2 |" in report.stdout


def test_launch_starts_workers_through_submitit_and_writes_the_leaderboard(tmp_path):
    out = tmp_path / "out"
    store = f"sqlite:///{out / 'regbench.db'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "launched", "--out", str(out), "--plan-only"]
    planned = regbench_cli("run", *plan, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    launched = regbench_cli("launch", "launched", "--workers", "2", "--out", str(out), cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr
    assert "launched 2 workers (local)" in launched.stdout
    assert "| shade | 2 |" in launched.stdout and (out / "leaderboard.md").is_file()
    check_sweep(store, "launched", ["baseline", "shade"], 2, [0, 1])
    assert len(list((out / "workers").glob("*_log.out"))) == 2  # submitit's per-job logs


def test_launch_of_a_benchmark_that_does_not_exist(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = regbench_cli("launch", "ghost", "--workers", "2", "--storage", f"sqlite:///{out / 's.db'}",
                       "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2 and "benchmark 'ghost' does not exist" in res.stderr
    assert not (out / "workers").exists()


def test_two_workers_share_a_journal_file_storage(tmp_path):
    journal = f"journal:{tmp_path / 'bench.log'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "jr", "--out", str(tmp_path / "out"),
            "--storage", journal, "--plan-only"]
    assert regbench_cli("run", *plan, cwd=tmp_path).returncode == 0
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([str(script), "worker", "--storage", journal, "--benchmark", "jr", "--quiet"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    from regbench.store import open_storage
    check_sweep(open_storage(journal), "jr", ["baseline", "shade"], 2, [0, 1])


def test_worker_per_gpu_starts_n_workers_that_share_the_work(tmp_path):
    """`regbench worker --per-gpu 2` on a machine without CUDA: two child workers on the CPU, every run once."""
    journal = f"journal:{tmp_path / 'bench.log'}"
    plan = ["--methods", "shade", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
            "--epochs", "1", "--quiet", "--pruner", "none", "--name", "pg", "--out", str(tmp_path / "out"),
            "--storage", journal, "--plan-only"]
    assert regbench_cli("run", *plan, cwd=tmp_path).returncode == 0
    done = regbench_cli("worker", "--storage", journal, "--benchmark", "pg", "--quiet", "--per-gpu", "2",
                        cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # each child says so when it finds no work left: two children, two lines
    assert done.stdout.count("worker: benchmark 'pg' has no work left") == 2, done.stdout
    from regbench.store import open_storage
    storage = open_storage(journal)
    check_sweep(storage, "pg", ["baseline", "shade"], 2, [0, 1])


def test_worker_per_gpu_bad_value_and_missing_benchmark_are_one_line(tmp_path):
    journal = f"journal:{tmp_path / 'bench.log'}"
    bad = regbench_cli("worker", "--storage", journal, "--benchmark", "x", "--per-gpu", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "regbench: error: --per-gpu must be at least 1, got 0"
    missing = regbench_cli("worker", "--storage", journal, "--benchmark", "nope", "--per-gpu", "3", cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "benchmark 'nope' does not exist" in missing.stderr
