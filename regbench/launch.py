"""`regbench launch`: N workers through submitit, so a user with a cluster does not write a launcher.

Each job runs ``regbench worker`` in a fresh Python process (local processes by default, Slurm jobs with a partition).
Workers coordinate only through the storage, so a job that dies loses nothing: its running trial goes stale and is
retried once by whichever worker looks next.
"""
from __future__ import annotations

import os
from pathlib import Path


def _worker(entry, storage_url: str, benchmark: str, data_dir: str, tracking_uri: str | None = None) -> int:
    """One job: ``entry`` is regbench.cli.main, handed down by the CLI (submitit pickles it by name), so this module
    never imports the CLI that imports it."""
    main = entry
    mirror = ["--tracking-uri", tracking_uri] if tracking_uri else []
    code = main(["worker", "--storage", storage_url, "--name", benchmark, "--data-dir", data_dir, "--quiet", *mirror])
    if code != 0:
        raise RuntimeError(f"regbench worker exited with status {code}")
    return code


def start_workers(entry, storage_url: str, benchmark: str, n: int, folder: Path, data_dir: str,
                  slurm_partition: str | None = None, timeout_min: int = 24 * 60,
                  tracking_uri: str | None = None) -> list:
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if slurm_partition:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        executor.update_parameters(slurm_partition=slurm_partition, timeout_min=timeout_min, name=f"rb-{benchmark}",
                                   cpus_per_task=4, gpus_per_node=1)
    else:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=timeout_min)
    with executor.batch():
        jobs = [executor.submit(_worker, entry, storage_url, benchmark, data_dir, tracking_uri) for _ in range(n)]
    return jobs


def wait(jobs) -> list[str]:
    """Block until every job ends; returns one line per failed job."""
    failures = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # submitit re-raises the job's exception with its traceback text
            text = str(exc).strip().splitlines()
            failures.append(f"job {job.job_id}: {text[-1] if text else type(exc).__name__}")
    return failures


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
