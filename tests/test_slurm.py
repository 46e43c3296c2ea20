"""`regbench launch --slurm` against a real Slurm (Debian's slurmctld/slurmd/munge, one node on 127.0.0.1, no cgroups,
no accounting daemon): each test starts its own cluster (tests/slurm_cluster.py, under a second), or uses the one
.ci/run started ($REGBENCH_TEST_SLURM_CONF; one test at a time, by a lock). Without Slurm's programs the tests skip,
except under REGBENCH_REQUIRE_SERVICES=1 (CI), where they fail.

Tiny benchmarks (digits/mlp, 1-4 epochs) on SQLite: the node is this machine."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import with_ctrl_c
from optuna.trial import TrialState
from slurm_cluster import Cluster, missing_programs
from test_protocol import check_sweep


@pytest.fixture
def cluster(tmp_path):
    """A cluster with partitions cpu (2 CPUs, 2000 MB, no GPU), short (MaxTime 30) and wide (two nodes)."""
    conf = os.environ.get("REGBENCH_TEST_SLURM_CONF")
    if conf:
        from filelock import FileLock

        with FileLock(f"{conf}.lock"):
            shared = Cluster(Path(conf).parent)
            yield shared
            shared.cancel_all()
        return
    yield from _private(tmp_path / "slurm")


def _private(folder: Path, **options):
    missing = missing_programs()
    if missing:
        if os.environ.get("REGBENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"REGBENCH_REQUIRE_SERVICES=1 but Slurm's programs are missing ({', '.join(missing)})")
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}); apt-get install slurmctld slurmd slurm-client "
                    f"munge, or set REGBENCH_TEST_SLURM_CONF")
    started = Cluster(folder, **options).start()
    try:
        yield started
    finally:
        started.cancel_all()
        started.stop()


def regbench(cluster, *args, cwd, python=None, **popen):
    """The CLI as a user runs it, on this cluster (SLURM_CONF), without MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in cluster.env.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [python or sys.executable, "-m", "regbench.cli", *args]
    if popen:
        return subprocess.Popen(argv, env=env, cwd=cwd, text=True, **popen)
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=420, check=False)


def plan(cluster, tmp_path, name, methods="shade", trials="2", seeds="2", epochs="1"):
    """`regbench run … --plan-only` (in this process: the workers train, not this)."""
    from regbench.cli import main

    code = main(["run", "--methods", methods, "--trials", trials, "--seeds", seeds, "--dataset", "digits", "--model",
                 "mlp", "--epochs", epochs, "--quiet", "--pruner", "none", "--name", name, "--out",
                 str(tmp_path / name), "--plan-only"])
    assert code == 0
    return f"sqlite:///{tmp_path / name / 'regbench.db'}"


def in_process(cluster, monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (its Slurm commands still run for real), for the checks that queue nothing."""
    from regbench.cli import main

    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def job_ids(stdout: str) -> list[str]:
    m = re.search(r"launched \d+ workers \(slurm \w+\): ([\d_, ]+);", stdout)
    assert m, stdout
    return [x.strip() for x in m.group(1).split(",")]


def job_info(cluster, job_id: str) -> dict:
    out = cluster.run("scontrol", "show", "job", "-d", "-o", job_id).stdout
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", out))


def logs(folder: Path, suffix: str = "err") -> str:
    return "".join(p.read_text() for p in sorted(folder.glob(f"*_log.{suffix}")))


def wait_for(what, check, timeout=240.0, every=0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial(store: str, name: str):
    """A RUNNING final or tuning trial of the benchmark that a worker has begun (its env names the worker)."""
    for study in optuna.get_all_study_names(store):
        if study.startswith(f"{name}:"):
            for t in optuna.load_study(study_name=study, storage=store).get_trials(states=(TrialState.RUNNING,)):
                if "env" in t.user_attrs:
                    return t
    return None


def job_of(trial) -> str:
    """The Slurm job (ARRAY_TASK) whose worker process runs ``trial`` (its pid is in the trial's env.worker)."""
    pid = int(trial.user_attrs["env"]["worker"].rsplit(":", 1)[1])
    env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env else \
        env["SLURM_JOB_ID"]


def test_cpu_partition_two_workers_at_once_leaderboard_and_exit_0(tmp_path, cluster):
    """Before: every job asked for --gpus-per-node=1 (sbatch refused it on a GPU-less partition, exit 70) and
    --cpus-per-task=4 (pending forever on a 2-CPU node); no --mem (each job took the node's memory: one at a time)."""
    store = plan(cluster, tmp_path, "cpu2", "shade", "0")
    res = regbench(cluster, "launch", "--name", "cpu2", "--out", str(tmp_path / "cpu2"), "--slurm", "cpu",
                   "--workers", "2", "--progress-seconds", "2", "--setup", "echo setup ran in job $SLURM_JOB_ID",
                   "--sbatch", "nice=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "| shade | 2 |" in res.stdout and (tmp_path / "cpu2" / "leaderboard.md").is_file()
    submitted = next(x for x in res.stdout.splitlines() if x.startswith("submitted: sbatch "))
    for flag in ("--array=0-1%2", "--cpus-per-task=1", "--mem=1000MB", "--partition=cpu", "--time=1440",
                 "--requeue", "--signal=USR2@90", "--job-name=rb-cpu2", "--nice=1"):
        assert flag in submitted.split(), (flag, submitted)
    assert "gpus" not in submitted and "gres" not in submitted
    assert res.stdout.count("submitted: sbatch") == 1
    # progress while waiting, from the store; the storage warning once (SQLite: fine on this one node)
    assert re.search(r"^launch: \[\d/4 runs\] 2 jobs running", res.stderr, re.MULTILINE), res.stderr
    assert res.stderr.count("is a SQLite file") == 1
    check_sweep(store, "cpu2", ["baseline", "shade"], 0, [0, 1])
    ids = job_ids(res.stdout)
    spans = [(job_info(cluster, i)["StartTime"], job_info(cluster, i)["EndTime"]) for i in ids]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # the two jobs ran at once
    assert all(job_info(cluster, i)["JobState"] == "COMPLETED" and job_info(cluster, i)["Nice"] == "1" for i in ids)
    workers = tmp_path / "cpu2" / "workers"
    assert logs(workers, "out").count("setup ran in job ") == 2
    assert re.search(r"^\[\d/4\] (baseline|shade) seed ", logs(workers), re.MULTILINE)  # worker logs keep their progress lines
    assert "Bypassing sacct" not in res.stderr + logs(workers) + logs(workers, "out")


def test_array_parallelism_runs_the_workers_one_at_a_time(tmp_path, cluster):
    """--array-parallelism N throttles the job array (sbatch --array=0-1%N): two workers, one at a time, on a node with
    room for both; the benchmark still finishes."""
    store = plan(cluster, tmp_path, "ap", "shade", "0")
    res = regbench(cluster, "launch", "--name", "ap", "--out", str(tmp_path / "ap"), "--slurm", "cpu", "--workers", "2",
                   "--array-parallelism", "1", "--progress-seconds", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    submitted = next(x for x in res.stdout.splitlines() if x.startswith("submitted: sbatch "))
    assert "--array=0-1%1" in submitted.split(), submitted
    check_sweep(store, "ap", ["baseline", "shade"], 0, [0, 1])
    spans = sorted((job_info(cluster, i)["StartTime"], job_info(cluster, i)["EndTime"]) for i in job_ids(res.stdout))
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # the second started once the first had ended


def test_requests_no_node_can_serve_are_refused_before_anything_is_queued(tmp_path, cluster, monkeypatch, capsys):
    plan(cluster, tmp_path, "bad")
    base = ["launch", "--name", "bad", "--out", str(tmp_path / "bad")]
    cases = {
        ("--slurm", "gpu"): "--slurm gpu: no such Slurm partition (this cluster has: cpu, short, wide)",
        ("--slurm", "cpu", "--gpus-per-job", "1"): "--gpus-per-job 1: partition 'cpu' has no GPUs",
        ("--slurm", "cpu", "--cpus-per-job", "3"): "no node of partition 'cpu' has more than 2 CPUs",
        ("--slurm", "cpu", "--mem", "3G"): "no node of partition 'cpu' offers more than 2000 MB",
        ("--slurm", "short", "--time", "31"): "--time 0:31:00 is above partition 'short''s MaxTime 0:30:00",
        ("--slurm", "cpu", "--constraint", "bigmem"): "Slurm refuses the jobs: ",
        ("--slurm", "wide"): "is a SQLite file, whose locking does not hold across machines; partition 'wide' runs "
                             "jobs on 2 nodes",
        ("--slurm", "cpu", "--sbatch", "=x"): "--sbatch '=x' is not KEY=VALUE",
        ("--slurm", "cpu", "--time", "3"): "--time 0:03:00 leaves a job no time to work: Slurm warns it 90 s before",
        ("--mem", "1G"): "--mem applies only to Slurm jobs",
    }
    for extra, message in cases.items():
        if message is None:
            continue
        code, _, err = in_process(cluster, monkeypatch, capsys, *base, *extra)
        lines = [x for x in err.splitlines() if x.startswith("regbench: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
    assert cluster.jobs("rb-bad") == [] and not (tmp_path / "bad" / "workers").exists()  # nothing queued or written
    from regbench import slurm

    part = slurm.Partition.read("short")  # the default time limit on a partition with a MaxTime: cut to it
    assert part.max_time_min == 30 and slurm.Partition.read("wide").total_nodes == 2


@pytest.fixture
def gpu_cluster(tmp_path):
    """Its own cluster: one node with two fake GPUs (GRES gpu, character devices), partition gpu."""
    yield from _private(tmp_path / "slurm-gpu", gpus=2, partitions={"gpu": ""})


def test_gpu_request_honoured_on_a_gres_partition(tmp_path, gpu_cluster):
    """The benchmark's device is auto: on a partition with GPUs each job asks for one and gets one (the allocation
    holds gpu:1, the job sees CUDA_VISIBLE_DEVICES=0); SIGTERM to launch cancels its job. --gpus-per-job 3 is more
    than the node has: refused."""
    plan(gpu_cluster, tmp_path, "g", "baseline", "0", "1", "1")
    too_many = regbench(gpu_cluster, "launch", "--name", "g", "--out", str(tmp_path / "g"), "--slurm", "gpu",
                        "--gpus-per-job", "3", cwd=tmp_path)
    assert too_many.returncode == 2 and "no node of partition 'gpu' has more than 2 GPUs" in too_many.stderr
    proc = regbench(gpu_cluster, "launch", "--name", "g", "--out", str(tmp_path / "g"), "--slurm", "gpu", "--workers",
                    "1", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first, submitted = proc.stdout.readline(), proc.stdout.readline()
    assert submitted.startswith("submitted: sbatch ") and "--gpus-per-node=1" in submitted.split(), submitted
    (job,) = job_ids(first)
    wait_for("the worker's first line", lambda: "GPUs 0" in logs(tmp_path / "g" / "workers", "out"), timeout=120)
    info = job_info(gpu_cluster, job)
    assert info["JobState"] == "RUNNING" and info["JOB_GRES"] == "gpu:1" and info["GRES"].startswith("gpu:1"), info
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and f"terminated (SIGTERM); cancelled Slurm jobs {job}" in err, err
    wait_for("the job cancelled", lambda: job_info(gpu_cluster, job).get("JobState") == "CANCELLED", timeout=60)


def test_scancel_of_a_worker_mid_trial_leaves_exact_counts_and_exit_0(tmp_path, cluster):
    """Before: the trial was recovered but launch said "1 of 2 workers failed: job 8_0: - /tmp/…_log.out" (exit 2) and
    wrote no leaderboard."""
    store = plan(cluster, tmp_path, "sc", "shade", "0", "2", "3")
    launch = regbench(cluster, "launch", "--name", "sc", "--out", str(tmp_path / "sc"), "--slurm", "cpu",
                      "--workers", "2", "--progress-seconds", "5", cwd=tmp_path, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    trial = wait_for("a worker mid-trial", lambda: running_trial(store, "sc"))
    victim = job_of(trial)
    cluster.run("scancel", victim, check=True)
    out, err = launch.communicate(timeout=400)
    assert launch.returncode == 0, err
    assert f"regbench: note: job {victim} cancelled" in err and "the benchmark is complete all the same" in err, err
    assert "| shade | 2 |" in out and "Leaderboard: " in out
    check_sweep(store, "sc", ["baseline", "shade"], 0, [0, 1])
    interrupted = [t for s in optuna.get_all_study_names(store) if s.startswith("sc:")
                   for t in optuna.load_study(study_name=s, storage=store).get_trials()
                   if str(t.user_attrs.get("fail_reason", "")).startswith("interrupted:")]
    assert len(interrupted) == 1 and "queued to resume" in interrupted[0].user_attrs["fail_reason"], interrupted
    status = regbench(cluster, "status", str(tmp_path / "sc"), cwd=tmp_path)
    for method in ("baseline", "shade"):
        assert re.search(rf"^  {method}: finals 2 done, 0 running, 0 failed.*, 0 remaining$", status.stdout, re.MULTILINE), \
            status.stdout


def test_ctrl_c_cancels_the_jobs_leave_jobs_keeps_them_and_a_rerun_reattaches(tmp_path, cluster):
    """Before: Ctrl-C said "interrupted; rerun the same command" while squeue still listed the jobs, and the rerun
    submitted two more."""
    plan(cluster, tmp_path, "cc", "shade", "0", "2", "1")
    base = ["launch", "--name", "cc", "--out", str(tmp_path / "cc"), "--slurm", "cpu", "--workers", "2"]

    def launch_then_ctrl_c(*extra):
        proc = regbench(cluster, *base, *extra, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        preexec_fn=with_ctrl_c)
        first = proc.stdout.readline()
        ids = job_ids(first)
        wait_for("both jobs running", lambda: all(job_info(cluster, i).get("JobState") == "RUNNING" for i in ids))
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        return proc.returncode, ids, err

    code, ids, err = launch_then_ctrl_c()
    assert code == 130 and f"cancelled Slurm jobs {', '.join(ids)}" in err, err
    wait_for("the jobs cancelled", lambda: all(job_info(cluster, i).get("JobState") == "CANCELLED" for i in ids),
             timeout=60)
    code, kept, err = launch_then_ctrl_c("--leave-jobs")
    assert code == 130 and f"Slurm jobs {', '.join(kept)} are left queued or running" in err, err
    assert f"scancel {' '.join(kept)}" in err
    assert all(job_info(cluster, i)["JobState"] == "RUNNING" for i in kept)
    rerun = regbench(cluster, *base, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reattached to 2 Slurm jobs of benchmark 'cc' still queued or running: {', '.join(kept)}" in rerun.stdout
    assert "launched" not in rerun.stdout and "| shade | 2 |" in rerun.stdout
    assert sorted(cluster.jobs("rb-cc")) == sorted(ids + kept)  # nothing more was submitted


def test_a_job_that_fails_at_start_is_named_with_its_cause(tmp_path, cluster):
    """Before: the error quoted "srun: error: … Exited with exit code 2"; the cause is the line above it in .err."""
    plan(cluster, tmp_path, "fs", "baseline", "0", "1", "1")
    venv = tmp_path / "venv"  # a venv of symlinks to this one, whose interpreter goes away before the job starts
    (venv / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / "lib").symlink_to(Path(sys.prefix) / "lib")
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    proc = regbench(cluster, "launch", "--name", "fs", "--out", str(tmp_path / "fs"), "--slurm", "cpu", "--workers",
                    "1", "--sbatch", "begin=now+4", cwd=tmp_path, python=str(venv / "bin" / "python"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    assert "launched 1 workers" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
    (venv / "bin" / "python").unlink()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    (job,) = job_ids(first)
    line = next(x for x in err.splitlines() if x.startswith(f"regbench: job {job}:"))
    assert "exit 2" in line and "execve()" in line and "No such file or directory" in line, err
    assert "benchmark 'fs' is not complete: 0 of 1 runs done" in err and "resume with the same command" in err


def test_the_warning_before_the_time_limit_saves_requeues_and_finishes(tmp_path, cluster):
    """Slurm signals USR2 to the job's steps 90 s before its time limit (--signal=USR2@90, as submitted): the worker
    stops at a safe point (its trial saved, a copy queued to resume), the job requeues itself and the rerun job
    finishes the benchmark. The signal is sent here as Slurm sends it (scancel --signal=USR2 to the steps), once a
    trial is running. The requeued job waits out Slurm's hold (until the old run's credential expires: cred_expire,
    10 s on the test cluster); releasing it sooner gets the job killed at start ("Job credential revoked": FAILED,
    seen under load), so nothing here hurries it. Twelve epochs keep the trial running long enough to be caught."""
    store = plan(cluster, tmp_path, "tl", "baseline", "0", "1", "12")
    launch = regbench(cluster, "launch", "--name", "tl", "--out", str(tmp_path / "tl"), "--slurm", "cpu",
                      "--workers", "1", "--time", "10", "--progress-seconds", "5", cwd=tmp_path,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    trial = wait_for("a worker mid-trial", lambda: running_trial(store, "tl"))
    job = job_of(trial)
    cluster.run("scancel", "--signal=USR2", job, check=True)
    def requeued():
        info = job_info(cluster, job)
        return info if info.get("Restarts") == "1" and info.get("JobState") == "PENDING" else None

    info = wait_for("the job requeued", requeued, timeout=120)
    assert info["Reason"] == "BeginTime", info
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err
    assert "| baseline | 1 |" in out
    text = logs(tmp_path / "tl" / "workers", "out")
    assert "stopping the worker so that its trial is saved" in text and "Requeued job" in text, text
    assert job_info(cluster, job)["JobState"] == "COMPLETED"
    trials = optuna.load_study(study_name="tl:baseline:final", storage=store).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], trials
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted:")
    assert "resumed_from_step" in trials[1].user_attrs, trials[1].user_attrs  # went on from the saved step
    check_sweep(store, "tl", ["baseline"], 0, [0])
