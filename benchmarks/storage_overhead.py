"""Storage overhead per trial: what the store costs a run, on SQLite, PostgreSQL and the journal file, in one process.

One real tiny run (digits + mlp, through the real Runner) provides a trial's real user attributes; then the same
storage traffic a final run makes (enqueue, claim, heartbeat-enabled storage, env/config/metrics/history attrs, one
report per epoch, tell) is replayed N times per storage and timed. Printed: median ms per trial and the ratio to the
in-memory storage and to the real trial's training time.

    python benchmarks/storage_overhead.py [--postgres postgresql://…] [--trials 30]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from regbench import registry
from regbench.config import RunConfig
from regbench.store import open_storage
from regbench.protocol import Benchmark, TuningRules
from regbench.runner import Runner

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", message="Heartbeat of storage")  # replay() uses ask/tell on purpose


def runner_overhead(storage, splits, seeds: int, epochs: int) -> float:
    """Seconds per trial the whole protocol adds around training (claiming, duplicate checks, heartbeat, attrs):
    wall time of a real Runner over ``seeds`` final runs minus the training time each run recorded, per run."""
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=epochs, batch_size=64,
                     split_hash=splits.split_hash)
    bench = Benchmark(name=f"r{time.time_ns()}", base=base, fixed={"baseline": {}}, seeds=list(range(seeds)),
                      protocol=TuningRules())
    t0 = time.perf_counter()
    Runner(storage, bench, splits).run()
    wall = time.perf_counter() - t0
    done = optuna.load_study(study_name=f"{bench.name}:baseline:final", storage=storage).get_trials()
    return (wall - sum(t.user_attrs["timings"]["seconds"] for t in done)) / len(done)


def real_trial(tmp: Path, epochs: int):
    """Run one real final trial (baseline, digits, mlp) and return (its frozen trial, its training seconds)."""
    storage = open_storage(f"sqlite:///{tmp / 'real.db'}")
    splits = registry.dataset("digits").load(tmp, split_seed=0)
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=epochs, batch_size=64,
                     split_hash=splits.split_hash)
    bench = Benchmark(name="real", base=base, fixed={"baseline": {}}, seeds=[0], protocol=TuningRules())
    Runner(storage, bench, splits).run()
    [trial] = optuna.load_study(study_name="real:baseline:final", storage=storage).get_trials()
    return trial, trial.user_attrs["timings"]["seconds"]


def replay(storage, template, n: int) -> list[float]:
    """The store traffic of n final runs, timed per run (claim → attrs → per-epoch reports → tell)."""
    study = optuna.create_study(study_name=f"replay-{time.time_ns()}", storage=storage, direction="maximize")
    attrs = dict(template.user_attrs)
    curve = sorted(template.intermediate_values.items()) or [(e["epoch"], e["val_acc"]) for e in attrs["history"]]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        study.enqueue_trial({"seed": i}, user_attrs={k: attrs[k] for k in ("config", "config_key", "group_key")})
        trial = study.ask()
        trial.suggest_int("seed", 0, 2**31 - 1)
        for key in ("env", "split_hash"):
            trial.set_user_attr(key, attrs[key])
        for epoch, value in curve:
            trial.report(value, epoch)
        for key in ("budget", "metrics", "history", "diagnostic_layers", "timings"):
            trial.set_user_attr(key, attrs[key])
        study.tell(trial, template.value, state=TrialState.COMPLETE)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL URL (e.g. $REGBENCH_TEST_POSTGRES_URL)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template, train_seconds = real_trial(tmp, args.epochs)
        storages = {"in-memory": optuna.storages.InMemoryStorage(),
                    "sqlite": open_storage(f"sqlite:///{tmp / 'bench.db'}"),
                    "journal": open_storage(f"journal:{tmp / 'bench.log'}")}
        if args.postgres:
            storages["postgresql"] = open_storage(args.postgres)
        print(f"real trial: digits/mlp baseline, {args.epochs} epochs, {train_seconds:.2f} s of training; "
              f"history {len(template.user_attrs['history'])} rows; {args.trials} replays per storage")
        base = None
        for name, storage in storages.items():
            replay(storage, template, 3)  # warm-up: tables, connections
            median = statistics.median(replay(storage, template, args.trials))
            base = base or median
            print(f"{name:>11}: {median * 1000:8.1f} ms per trial  ({median / base:5.1f}x in-memory; "
                  f"{median / train_seconds:6.2%} of the trial's training time)")
        print(f"whole protocol around training (real Runner, {args.seeds} final runs of 1 epoch each):")
        splits = registry.dataset("digits").load(tmp, split_seed=0)
        for name, storage in storages.items():
            per_trial = runner_overhead(storage, splits, args.seeds, 1)
            print(f"{name:>11}: {per_trial * 1000:8.1f} ms per trial")


if __name__ == "__main__":
    main()
