"""Shared pieces of the paper suites: intervals, verdict words, markdown tables, provenance, model capture."""
from __future__ import annotations

import datetime
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from regbench.provenance import git_commit
from regbench.stats import t_interval

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"
WORKERS = 2  # suites that fan out: two single-threaded training processes (the reference box has 2 cores)


def fmt_ci(values, digits: int = 2, scale: float = 1.0) -> str:
    """'mean [low, high]' of the 95 % t-interval, scaled (e.g. 100 for percent)."""
    m, lo, hi = t_interval(np.asarray(values, dtype=float) * scale)
    if not np.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(word: str, why: str) -> str:
    return f"**{word}** — {why}"


def provenance(command: str, seconds: float) -> str:
    """One line: the command, when, where, which commit, how long (benchopt-style provenance)."""
    commit = (git_commit() or "n/a")[:10]
    import torch

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"Made by `{command}` on {when}, git {commit}, {platform.machine()} {platform.system()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {seconds:.0f} s.")


def keep_model(method):
    """Make ``method`` remember the model the engine builds (its ``attach`` sees it), so a suite can measure the
    trained network (Jacobians, decision boundaries) after ``engine.train`` returns. The method is unchanged
    otherwise; the engine's own detach still runs."""
    attach = method.attach

    def attach_and_keep(model, ctx):
        method.model = model
        return attach(model, ctx)

    method.attach = attach_and_keep
    return method


def write_report(out_dir: Path, name: str, text: str) -> Path:
    from regbench.datasets.base import atomic_write_bytes

    path = Path(out_dir) / f"{name}.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


@contextmanager
def torch_threads(n: int):
    """Run tiny models on ``n`` intra-op threads (restored after): on a shared 2-core box a 16-wide MLP spends more
    time synchronising two threads than computing (measured: ~5 s vs ~20 s per 200-epoch rings run)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_data_dir(given=None) -> Path:
    """``given`` (resolved at the CLI edge), else the CLI's default (REGBENCH_DATA, else ~/.cache/regbench)."""
    if given is None:
        from regbench.arguments import default_data_dir

        given = default_data_dir()
    return Path(given).expanduser()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread per process beats two threads fighting over two cores


def run_parallel(fn, tasks: list, workers: int = WORKERS) -> list:
    """``[fn(*t) for t in tasks]`` on ``workers`` spawned processes (results in task order). Spawn, not fork: a forked
    child of a process that already ran torch's thread pool can deadlock. One worker runs in this process."""
    workers = max(1, min(workers, len(tasks), os.cpu_count() or 1))
    if workers == 1:
        with torch_threads(1):
            return [fn(*t) for t in tasks]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(fn, *t) for t in tasks]
        return [f.result() for f in futures]
