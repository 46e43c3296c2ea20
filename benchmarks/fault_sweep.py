"""Search the moments a kill -9 can land (issue 17): the full sweep behind tests/test_fault_injection.py.

For every fault point (regbench/faults.py: the k-th tuning trial / final run / epoch / MLflow mirror / report, and a
second kill inside the stale-trial recovery of the rerun) × store (the default SQLite in --out, a given SQLite,
PostgreSQL when REGBENCH_TEST_POSTGRES_URL is set, a journal file) × heartbeat grace period (elapsed before the rerun,
or not: the rerun then waits for it, about 30 s): run a small sweep with the fault armed (it must die by SIGKILL),
rerun it until it exits 0 (at most 3 reruns), then check the store exactly as the tests do (every final run once,
the tuning budget exact, each killed trial failed with its reason and retried once with the same params, status
counts no failure). Prints one line per case and a summary; exit 1 if any case failed.

    python benchmarks/fault_sweep.py                 # everything (~1-2 h on 2 cores)
    python benchmarks/fault_sweep.py --stores sqlite --points epoch:1,final:2 --grace elapsed
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fault_injection import SMALL, age_all_heartbeats, check_exact, regbench  # noqa: E402

# SMALL: 2 tuning trials, 2 ses finals, 2 baseline finals, 1 epoch each → 6 trials, 6 epochs, 6 mirrors.
POINTS = ["tune:1", "tune:2", "epoch:1", "epoch:3", "epoch:5", "final:1", "final:2", "final:4", "mirror:1",
          "mirror:3", "mirror:6", "report:1", "epoch:2+recover:1"]


def store_url(kind: str, folder: Path) -> str | None:
    return {"default": None, "sqlite": f"sqlite:///{folder / 'given.db'}", "journal": f"journal:{folder / 'j.log'}",
            "postgresql": os.environ.get("REGBENCH_TEST_POSTGRES_URL")}[kind]


def case(point: str, kind: str, elapsed: bool) -> str:
    first, _, second = point.partition("+")
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        folder = Path(tmp)
        storage, name = store_url(kind, folder), f"fault-{uuid.uuid4().hex[:8]}"
        args = [*SMALL, "--out", str(folder / "out"), "--name", name, *(["--storage", storage] if storage else [])]
        killed = regbench(args, folder, first)
        if killed.returncode != -signal.SIGKILL:
            tail = killed.stderr.strip().splitlines()[-1:] if killed.returncode else []
            return f"not killed (exit {killed.returncode}): the point is never reached {' '.join(tail)}"
        url = storage or f"sqlite:///{folder / 'out' / 'regbench.db'}"
        reruns = 0
        if second:  # the rerun that recovers the killed trial dies inside that recovery
            if elapsed:
                age_all_heartbeats(url)
            reruns += 1
            if regbench(args, folder, second).returncode != -signal.SIGKILL:
                return "skipped (no recovery to kill: nothing was stale)"
        for reruns in range(reruns + 1, reruns + 4):
            if elapsed:
                age_all_heartbeats(url)
            again = regbench(args, folder)
            if again.returncode == 0:
                break
            if "Traceback" in again.stderr:
                return f"rerun {reruns} crashed: {again.stderr.strip().splitlines()[-1]}"
        else:
            return f"no rerun exited 0 (last: {again.returncode}: {again.stderr.strip()[-300:]})"
        check_exact(url, name)
        status = regbench(["status", "--storage", url, "--name", name], folder)
        if status.returncode != 0 or set(re.findall(r"(\d+) failed", status.stdout)) != {"0"}:
            return f"status counts a failure: {status.stdout.strip()}"
        return f"ok ({reruns} rerun{'s' if reruns > 1 else ''})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--stores", default="default,sqlite,postgresql,journal")
    ap.add_argument("--grace", default="elapsed,waited", help="elapsed (heartbeats aged before each rerun), waited")
    opts = ap.parse_args()
    stores = [s for s in opts.stores.split(",") if s != "postgresql" or os.environ.get("REGBENCH_TEST_POSTGRES_URL")]
    results, started = [], time.perf_counter()
    for kind in stores:
        for grace in opts.grace.split(","):
            if kind == "default" and grace == "waited":
                continue  # the output-dir lock fails a dead run's trials at once: no grace period involved
            for point in opts.points.split(","):
                t0 = time.perf_counter()
                try:
                    outcome = case(point, kind, grace == "elapsed")
                except AssertionError as exc:
                    outcome = f"WRONG COUNTS: {str(exc)[:300]}"
                except Exception:  # noqa: BLE001 - report and go on to the next case
                    outcome = f"ERROR: {traceback.format_exc().strip().splitlines()[-1]}"
                results.append(outcome)
                print(f"{kind:10s} grace {grace:7s} {point:18s} {outcome}  [{time.perf_counter() - t0:.0f} s]",
                      flush=True)
    bad = [r for r in results if not r.startswith(("ok", "skipped", "not killed (exit 0)"))]
    print(f"{len(results)} cases, {sum(r.startswith('ok') for r in results)} ok, {len(bad)} failed, "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
