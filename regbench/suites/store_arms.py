"""A suite's arms as benchmarks: each built and run as `regbench run` builds and runs one (regbench/protocol.py,
regbench/runner.py), into an SQLite store in the suite's output folder, and read back from that store
(docs/architecture.md, "The store is the record"). So a suite resumes after a kill like a benchmark: a rerun of the
same suite command trains nothing its store already holds.

Suites whose benchmarks are independent (one per β, one per training-set size) give each its own store folder
(``store_dir``), so ``run_many`` can train them in parallel processes, each holding its own folder's lock.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from regbench.errors import ConfigError

from .common import run_parallel


def store_dir(out_dir, suite: str, benchmark: str | None = None) -> Path:
    """``OUT/<suite>-store`` (one store for all of a suite's benchmarks), or ``OUT/<suite>-store/<benchmark>``."""
    root = Path(out_dir) / f"{suite}-store"
    return root if benchmark is None else root / benchmark


def run_benchmark(out, name: str, dataset: str, model: str, fixed: dict, recipe: dict, seeds: list[int], *,
                  data_dir, device: str, trials: int = 0, rules: dict | None = None, train_size: int | None = None,
                  model_kwargs=None, shift: str | None = None, corruptions=None, severities=None, command: str = ""):
    """Build and run one benchmark as `regbench run` does (its spec saved, dead trials failed and retried, then
    ``commands.work``), into the store at ``out``; returns the final runs read back from the store
    (``tidy.runs_frame``: one row per method × seed). ``fixed``: method -> hparams (each method one arm);
    ``rules``: further ``protocol.TuningRules`` fields (pruner, startup trials, searched ranges)."""
    from regbench import commands, inputs, protocol, registry, runner, tidy
    from regbench.config import RunConfig
    from regbench.datasets import shift as shift_sets
    from regbench.store import OutputLock, default_storage_url, load_spec, open_storage

    recipe = dict(recipe)
    augment = recipe.pop("augment", "none")
    ds = registry.dataset(dataset)
    splits = ds.load(Path(data_dir), split_seed=0, train_size=train_size, augment=augment)
    base = RunConfig(method="baseline", dataset=dataset, model=model, model_kwargs=dict(model_kwargs or {}),
                     train_size=train_size, shift=shift, augment=getattr(splits, "augment", "none"),
                     split_hash=splits.split_hash, device=device, data_dir=str(data_dir), **recipe)
    if shift:
        splits = dataclasses.replace(splits, shift=shift_sets.load(shift, Path(data_dir), splits,
                                                                   corruptions_subset=corruptions,
                                                                   severities=severities))
    tuning = protocol.TuningRules(trials=trials, **(rules or {}))
    bench = protocol.Benchmark(name=name, base=base, fixed=fixed, seeds=list(seeds), protocol=tuning,
                               command=command)
    for method, hparams in fixed.items():  # a layer rule that selects nothing here fails before any write
        inputs.check_attach(method, registry.method_class(method).resolve(hparams), model, ds, base.model_kwargs)
    protocol.check_search_spaces(bench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        storage = open_storage(default_storage_url(out))
        splits.save_indices(out / "splits" / f"{dataset}-{splits.split_hash[:12]}.json")
        bench.extra = {"split_hash": splits.split_hash, "storage": default_storage_url(out)}
        protocol.save_spec(storage, bench)
        runner.fail_dead_trials(storage, protocol.study_names(bench))
        commands.work(storage, bench, splits, None, quiet=True)  # no MLflow mirror: the suite reports from the store
        frame = tidy.runs_frame(storage, name, load_spec(storage, name))
    if frame.empty or len(frame) != len(fixed) * len(seeds):
        raise ConfigError(f"benchmark {name} in {out} finished with {len(frame)} of {len(fixed) * len(seeds)} "
                          f"final runs (failed runs are in its store); rerun the same command to retry them")
    return frame


def run_many(jobs: list[dict]) -> list:
    """``run_benchmark(**job)`` for each job, on the suites' worker processes (results in job order); each job must
    name a store folder of its own (``out``)."""
    outs = [Path(job["out"]).resolve() for job in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError("run_many: two benchmarks share a store folder; give each its own (store_dir)")
    return run_parallel(_run_job, [(job,) for job in jobs])


def _run_job(job: dict):
    return run_benchmark(**job)


def tuning_runs(out, name: str, method: str) -> list:
    """The tuning trials of ``method`` in benchmark ``name`` of the store at ``out``, oldest first, as
    ``record.RunRecord``s (empty when the method was not tuned)."""
    from regbench import record
    from regbench.store import default_storage_url, load_spec, open_storage, trials_of

    storage = open_storage(default_storage_url(Path(out)))
    spec = load_spec(storage, name) or {}
    study = spec.get("methods", {}).get(method, {}).get("tune_study")
    return [record.RunRecord.of(t) for t in sorted(trials_of(storage, study), key=lambda t: t.number)]


def per_seed(frame, method: str, column: str):
    """One column of a method's final runs, ordered by seed (seeds are shared across arms: paired)."""
    rows = frame[frame.method == method].sort_values("seed")
    return rows[column].to_numpy(dtype=float)
