"""`regbench launch`: N workers through submitit, so a user with a cluster does not write a launcher.

Each job runs ``regbench worker`` (local processes by default, Slurm jobs with ``--slurm PARTITION``). Workers
coordinate only through the storage, so a job that dies loses nothing: its running trial goes stale and is retried by
whichever worker looks next, and a worker stopped by a signal saves its trial and queues it to resume.

Here: the command's options (``add_parser``), the job each worker is (``Worker``), and the submission
(``start_workers``). Following the jobs and the outcome are regbench/launcher.py's; what Slurm is asked, and how
its answers are read, is regbench/slurm.py's.
"""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from regbench.arguments import CACHE_DIR, OUTPUT_DIR, STORE_URL, TRACKING_URI

REQUEUES = 20  # times a job that reaches its time limit saves its trial and requeues itself (submitit's countdown)


def add_parser(sub) -> None:
    la = sub.add_parser("launch", help="start N workers through submitit (local processes or Slurm), then report",
                        description="Start N `regbench worker`s on a planned benchmark (local processes, or Slurm jobs "
                                    "with --slurm), follow them, and write the leaderboard once the benchmark is "
                                    "complete. The outcome is read from the store, not from the jobs' exit codes.")
    la.add_argument("--name", help="a benchmark planned in the storage (`regbench run --name NAME --plan-only`)")
    la.add_argument("name_positional", nargs="?", metavar="NAME", help=argparse.SUPPRESS)  # deprecated: use --name
    la.add_argument("--tracking-uri", help="MLflow tracking URI the workers mirror to (default: $MLFLOW_TRACKING_URI, "
                                           "else the one the benchmark's run recorded)", kind=TRACKING_URI)
    la.add_argument("--workers", type=int, default=2, help="number of workers, one job each (default 2)")
    la.add_argument("--per-gpu", type=int, default=1, metavar="N",
                    help="worker processes per job: N on each GPU the job gets (N on the CPU without one); default 1")
    la.add_argument("--storage", kind=STORE_URL, help="storage URL (default: sqlite:///runs/NAME/regbench.db)")
    la.add_argument("--out", kind=OUTPUT_DIR, help="where the leaderboard and worker logs go (default runs/NAME)")
    la.add_argument("--data-dir", default=None, help="dataset cache (default: $REGBENCH_DATA or ~/.cache/regbench)",
                    kind=CACHE_DIR)
    la.add_argument("--progress-seconds", type=float, default=None, metavar="S",
                    help="while waiting, a progress line every S seconds (default: a live line on a terminal, one a "
                         "minute otherwise)")
    la.add_argument("--timeout-min", type=int, default=None, help=argparse.SUPPRESS)  # old spelling of --time
    sl = la.add_argument_group("Slurm (with --slurm; each worker is one job; checked with sinfo/scontrol before "
                               "anything is queued)")
    sl.add_argument("--slurm", metavar="PARTITION", help="submit the workers as Slurm jobs to this partition")
    sl.add_argument("--gpus-per-job", type=int, default=None, metavar="N",
                    help="GPUs per job (default: 1 when the benchmark's device is cuda, or auto on a partition with "
                         "GPUs; else 0: no GPU is requested)")
    sl.add_argument("--cpus-per-job", type=int, default=None, metavar="N",
                    help="CPUs per job (default: one per worker process, --per-gpu)")
    sl.add_argument("--mem", metavar="SIZE", help="memory per job, e.g. 4G (default: the cluster's default if it sets "
                                                   "one, else a node's memory per CPU times the job's CPUs, at most 4G)")
    sl.add_argument("--time", metavar="TIME", help="time limit per job, in minutes or D-HH:MM:SS (default: 24 hours, "
                                                    "or the partition's MaxTime if shorter); a job that reaches it "
                                                    "saves its trial and requeues itself")
    sl.add_argument("--account", help="Slurm account to charge")
    sl.add_argument("--qos", help="Slurm quality of service")
    sl.add_argument("--constraint", help="Slurm node features the jobs need (sbatch --constraint)")
    sl.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                    help="at most N of the jobs run at once (default: all of them)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra sbatch parameter, e.g. --sbatch reservation=mine or --sbatch exclusive (repeatable)")
    sl.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="a shell line each job runs before its worker, e.g. --setup 'module load cuda' (repeatable)")
    sl.add_argument("--leave-jobs", action="store_true",
                    help="on Ctrl-C/SIGTERM leave the jobs queued or running (default: cancel them); rerun the same "
                         "command to reattach to them")


class Worker:
    """One job: ``regbench worker ARGV`` as a child process, so that the job can stop it at a safe point.

    Slurm sends USR2 before a job's time limit (and on preemption); submitit's handler then calls ``checkpoint``,
    which stops the worker like SIGTERM does (its running trial is saved and queued to resume) and hands submitit a
    new copy of this job, which submitit saves before requeueing the job (``scontrol requeue``): the requeued job
    starts a fresh worker that resumes the trial. ``scancel`` signals every process of the job, so the worker gets
    its SIGTERM directly; the worker ignores USR2 (only this process acts on it)."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self._child = None

    def __call__(self) -> int:
        import subprocess
        import sys

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if os.environ.get("SLURM_CPUS_PER_TASK") and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]  # torch's threads: the CPUs the job has
        local = os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
        if not local:
            import socket

            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            job = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{task}" if task else os.environ.get("SLURM_JOB_ID", "?")
            print(f"regbench: worker job {job} on {socket.gethostname()}: "
                  f"{os.environ.get('SLURM_CPUS_PER_TASK', '?')} CPUs, GPUs "
                  f"{os.environ.get('CUDA_VISIBLE_DEVICES') or 'none'}", flush=True)
        # A local worker has a session of its own: Ctrl-C at the terminal, or launch cancelling its jobs, reaches it
        # once, through this process (a second signal would stop it at once, not at a safe point).
        self._child = subprocess.Popen([sys.executable, "-m", "regbench.cli", "worker", *self.argv], env=env,
                                       preexec_fn=_ignore_usr2,  # noqa: PLW1509 - no other thread runs here
                                       start_new_session=local)
        if local:
            forwarded = []

            def forward(signum, _frame):
                if not forwarded and self._child.poll() is None:
                    forwarded.append(signum)
                    self._child.send_signal(signum)

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, forward)
        while (code := self._child.poll()) is None:  # not Popen.wait(): ``checkpoint`` may interrupt it (below)
            time.sleep(0.5)
        if code != 0:
            raise RuntimeError(f"regbench worker exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler: stop the worker at its next safe point, then requeue this job (a new copy)."""
        from submitit.helpers import DelayedSubmission

        child = self._child
        if child is not None and child.poll() is None:
            print("regbench: job time limit near or preempted (USR2): stopping the worker so that its trial is saved "
                  "and queued to resume; the job is requeued", flush=True)
            child.send_signal(signal.SIGTERM)
            if not _exited(child, timeout=75):  # Slurm's warning comes 90 s before the limit
                child.kill()  # still running: stop it now (its trial is retried once found stale)
        return DelayedSubmission(Worker(self.argv))


def _exited(child, timeout: float) -> bool:
    """Wait for ``child`` to end, from a signal handler: Popen.wait would wait for the lock that the interrupted
    ``poll`` may hold (in this same thread), so the child is reaped here directly."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if child.returncode is not None:
            return True
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return True
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return True
        time.sleep(0.2)
    return False


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def worker_argv(storage_url: str, benchmark: str, data_dir: str, tracking_uri: str | None, per_gpu: int,
                device: str | None) -> list[str]:
    argv = ["--storage", storage_url, "--name", benchmark, "--data-dir", data_dir]
    argv += ["--tracking-uri", tracking_uri] if tracking_uri else []
    argv += ["--per-gpu", str(per_gpu)] if per_gpu != 1 else []
    argv += ["--device", device] if device else []
    return argv


def start_workers(argv: list[str], n: int, folder: Path, request=None, job_name: str = "regbench",
                  comment: str | None = None, parallelism: int | None = None, setup: list[str] | None = None) -> list:
    """Submit ``n`` Worker jobs: Slurm jobs (one array) for a ``slurm.Request``, else local processes. Returns
    submitit's job objects."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if request is not None:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=REQUEUES)
        params = {"partition": request.partition, "time": request.time_min, "cpus_per_task": request.cpus,
                  "job_name": job_name, "array_parallelism": parallelism or n,
                  "additional_parameters": {"requeue": True, **request.extra}}
        optional = {"gpus_per_node": request.gpus or None, "mem": f"{request.mem_mb}MB" if request.mem_mb else None,
                    "account": request.account, "qos": request.qos, "constraint": request.constraint,
                    "comment": comment, "setup": list(setup) if setup else None}
        executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    else:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=24 * 60)
    with executor.batch():
        jobs = [executor.submit(Worker(argv)) for _ in range(n)]
    return jobs


def submitted_line(folder: Path, job_id: str) -> str | None:
    """The sbatch line of what was submitted, from the script submitit wrote (its #SBATCH lines, logs aside)."""
    script = folder / f"{job_id.split('_')[0]}_submission.sh"
    if not script.is_file():
        return None
    flags = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    shown = [f for f in flags if not f.startswith(("--output=", "--error=", "--open-mode="))]
    return "sbatch " + " ".join(shown)


def release(jobs: list) -> None:
    """Drop submitit's job objects while the interpreter is whole: they sit in reference cycles, and a LocalJob
    collected at exit runs its ``__del__`` after the modules it uses are torn down, printing "Exception ignored in:
    LocalJob.__del__ ... TypeError" once per job after a launch that went well."""
    import gc

    jobs.clear()
    gc.collect()


def visible_devices() -> list[str | None]:
    """One entry per CUDA device this process may use (its index, to pin a child with CUDA_VISIBLE_DEVICES), or
    [None] on a machine without CUDA, where the workers share the CPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")][:n] if visible else [str(i) for i in range(n)]
    return ids


def run_per_device(worker_argv: list[str], per_gpu: int) -> int:
    """`regbench worker --per-gpu N`: N worker processes pinned to each visible GPU (small models leave a big GPU
    idle; separate processes overlap their kernels without sharing a Python interpreter). Each child is the same
    worker command without --per-gpu; they coordinate through the storage like any workers. Ctrl-C/SIGTERM reach
    every child (they stop after their current step and leave resumable trials); returns the worst exit status."""
    import signal
    import subprocess
    import sys

    children = []
    for device in visible_devices():
        env = {**os.environ, "REGBENCH_PER_GPU_CHILD": "1"}  # the parent said where runs are (not) mirrored
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        for _ in range(per_gpu):
            children.append(subprocess.Popen([sys.executable, "-m", "regbench.cli", *worker_argv], env=env))
    previous = {}

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return max(failed, key=lambda c: (c > 0, abs(c)))  # a child's own status (2, 130, 143) over a signal number
