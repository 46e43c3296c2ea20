"""`regbench launch`: N workers through submitit, so a user with a cluster does not write a launcher.

Each job runs ``regbench worker`` in a fresh Python process (local processes by default, Slurm jobs with a partition).
Workers coordinate only through the storage, so a job that dies loses nothing: its running trial goes stale and is
retried once by whichever worker looks next.
"""
from __future__ import annotations

from pathlib import Path


def _worker(storage_url: str, benchmark: str, data_dir: str) -> int:
    from regbench.cli import main

    code = main(["worker", "--storage", storage_url, "--benchmark", benchmark, "--data-dir", data_dir, "--quiet"])
    if code != 0:
        raise RuntimeError(f"regbench worker exited with status {code}")
    return code


def start_workers(storage_url: str, benchmark: str, n: int, folder: Path, data_dir: str,
                  slurm_partition: str | None = None, timeout_min: int = 24 * 60) -> list:
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
        jobs = [executor.submit(_worker, storage_url, benchmark, data_dir) for _ in range(n)]
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
