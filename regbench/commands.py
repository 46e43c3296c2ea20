"""What each CLI command does: resolve options into RunConfigs at the edge, then call study/engine/report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from regbench import faults, inputs, registry
from regbench import tracking as _tracking
from regbench.config import RunConfig
from regbench.errors import ConfigError, RegbenchError
from regbench.statefiles import POINTER_FILE
from regbench.store import safe_url


def tracking_uri_for(option: str | None, bench=None, out: Path | None = None, default_in_out: bool = True) -> str | None:
    """Where a command mirrors to MLflow, one rule for every command: ``--tracking-uri``, else MLFLOW_TRACKING_URI,
    else the URI the benchmark's `regbench run` recorded (when it can be used here: not a masked password, not a
    SQLite file in a folder this machine lacks), else OUT/mlflow.db (``run``; report and sync-mlflow when it
    exists), else None: not mirrored (see ``not_mirrored``)."""
    if option or os.environ.get("MLFLOW_TRACKING_URI"):
        return option or os.environ["MLFLOW_TRACKING_URI"]
    recorded = (bench.extra.get("tracking_uri") if bench is not None else None) or ""
    folder = Path(recorded.removeprefix("sqlite:///")).parent if recorded.startswith("sqlite:///") else None
    if recorded and "***" not in recorded and (folder is None or folder.is_dir()):
        return recorded
    if out is not None and (default_in_out or (out / "mlflow.db").is_file()):
        return _tracking.default_tracking_uri(out)
    return None


def not_mirrored(storage_url: str, name: str) -> str:
    """The one line a command prints when it has nowhere to mirror to."""
    return (f"regbench: note: runs are not mirrored to MLflow (no --tracking-uri, MLFLOW_TRACKING_URI is unset and "
            f"benchmark {name!r} recorded none usable here); the store keeps them: mirror them later with `regbench "
            f"sync-mlflow --storage {safe_url(storage_url)} --name {name} --tracking-uri URI`")


def apply_heartbeat(storage, bench) -> None:
    """A benchmark may record its own heartbeat (spec ``heartbeat``: ``{"interval": s, "grace": s}``; default 10 and
    30 s, regbench/store.py). Every process of the benchmark applies it, since the processes must agree: a grace
    period shorter than another worker's heartbeat interval would fail that worker's live trials."""
    beat = bench.extra.get("heartbeat")
    if beat and hasattr(storage, "grace_period"):  # RDB storages; the journal file has no heartbeat
        storage.heartbeat_interval, storage.grace_period = int(beat["interval"]), int(beat["grace"])


def benchmark_name(args, command: str) -> tuple[str, str | None]:
    """(name, deprecation line or None): the benchmark as every command names it, ``--name``; the old spellings
    (worker ``--benchmark``, launch's positional NAME) still work, with one deprecation line that the caller prints
    once the benchmark is found (a mistake stays one line)."""
    old = getattr(args, "benchmark", None) or getattr(args, "name_positional", None)
    if old is not None:
        spelling = "--benchmark NAME" if getattr(args, "benchmark", None) else "NAME as a positional argument"
        if args.name is not None and args.name != old:
            raise ConfigError(f"{command}: --name {args.name!r} and {spelling} {old!r} differ; give --name only")
        return old, (f"regbench: note: `{command} {spelling}` is deprecated; use `{command} --name NAME` (as run, "
                     f"status, report, sync-mlflow and export do)")
    if args.name is None:
        raise ConfigError(f"{command}: which benchmark? give --name NAME (as planned by `regbench run --name NAME`)")
    return args.name, None


def work(storage, bench, splits, tracking_uri: str | None, quiet: bool = False, wait: bool = True,
         checkpoints: dict | None = None, parallel_seeds: int = 1, worker: str | None = None) -> None:
    """Run this process's share of a benchmark's trials, one line each, mirrored to MLflow as they finish.
    ``checkpoints``: Runner's checkpoint_dir / checkpoint_seconds / keep_checkpoints (see inputs.checkpoint_options).
    ``worker``: this worker's identity (None for `regbench run`), which seeds its own sampler
    (runner.worker_sampler_seed)."""
    from regbench import record, runner, status, tracking
    from regbench.progress import Progress

    progress = not quiet and sys.stderr.isatty()
    line = None if quiet else Progress(storage, bench)  # runs done/planned, the epoch, the time left
    say = (lambda *_: None) if line is None else line.write
    def warn(msg: str) -> None:  # warnings show even with --quiet
        print(msg, file=sys.stderr, flush=True)

    tracker = tracking.SafeTracker(tracking_uri, bench.name, warn) if tracking_uri else None
    if tracker is not None and bench.plan:  # the runs of the plans this one superseded leave MLflow's parents
        tracker.use_plan(bench.plan)

    def on_trial(outcome: runner.Outcome) -> None:
        t = outcome.trial
        run = record.RunRecord.of(t)
        if record.skipped(t):
            return
        # "[done/planned]" counts the benchmark's runs, whichever worker ran them (planned is unknown when tuning is
        # budgeted in epochs), so every worker's lines agree on how far the benchmark is.
        done, planned = status.run_counts(storage, bench)
        what = (f"{outcome.method} tuning trial {t.number}" if outcome.kind == "tune"
                else f"{outcome.method} seed {run.seed if run.seed is not None else '?'}")
        what = f"[{done}{f'/{planned}' if planned else ''}] {what}"
        spent = run.budget
        if run.complete:
            m = run.metrics
            scores = ", ".join(f"{k.split('_')[0]} {m[k]:.2%}" for k in ("test_acc", "val_acc") if k in m)
            say(f"{what}: {scores}, {spent.get('seconds', 0):.1f} s")
        elif t.state.name == "PRUNED":
            say(f"{what}: pruned after {spent.get('epochs', '?')} epochs")
        elif record.interrupted(t):
            say(f"{what}: {run.reason}")
        else:
            say(f"{what}: FAILED ({run.reason or 'unknown'})")
        if tracker is not None:
            tracker.mirror(outcome.study.study_name, t)

    worker_loop = runner.Runner(storage, bench, splits, progress=progress, on_trial=on_trial, wait=wait,
                                 parallel_seeds=parallel_seeds, worker=worker, watch=line, **(checkpoints or {}))
    for method in bench.methods if not bench.protocol.tunes else []:
        keys = {c.key() for c in worker_loop.select(method)}
        done = sum(t.state.name == "COMPLETE" and record.config_key(t) in keys
                   for t in worker_loop.final_study(method).get_trials(deepcopy=False))
        if done:
            say(f"{method}: {done} of {len(bench.seeds)} seeds already in the store, skipped")
    try:
        worker_loop.run()
    finally:
        if line is not None:
            line.close()
    if tracker is not None and tracker.active:
        tracking.mirror_benchmark(storage, tracker, bench)
        tracker.close()


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_report(storage, name: str, out: Path, tracking_uri: str | None) -> Path:
    from regbench import report, tracking

    paths = report.write_report(storage, name, out)
    faults.point("report")  # test hook (regbench/faults.py): a crash between the leaderboard and its MLflow copy
    if tracking_uri:  # the leaderboard and its figures go to every method's parent run
        tracking.attach_report(tracking_uri, name, paths, _warn)
    return paths[0]


def load_benchmark(storage, name: str):
    import optuna

    from regbench import protocol
    from regbench.store import load_spec

    spec = load_spec(storage, name)
    if spec is None or (isinstance(spec, dict) and "base" not in spec):
        names = [s for s in optuna.get_all_study_names(storage) if ":" not in s]
        raise ConfigError(f"benchmark {name!r} does not exist in this storage (it holds: {', '.join(names) or 'none'}); "
                          f"create it with `regbench run ... --storage URL --plan-only`")
    from regbench.statefiles import SPEC_FIX, StateFileError, check_spec

    check_spec(spec, name)  # the stored plan, schema- and range-checked as the command line's values are
    try:
        return protocol.Benchmark.from_spec(spec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(f"the plan of benchmark {name!r} in the store cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:80]}); {SPEC_FIX}") from None


def load_splits(cfg: RunConfig, data_dir: Path):
    """The splits (and shift set) a RunConfig trained on, rebuilt from the dataset (a worker on another machine)."""
    import dataclasses

    dataset = registry.dataset(cfg.dataset)
    # augment None in a stored config means none (also for configs older than the field), never the dataset default
    options = {"train_per_class": cfg.train_per_class, "augment": cfg.augment or "none"}
    splits = dataset.load(data_dir, split_seed=cfg.split_seed, train_size=cfg.train_size,
                          **{k: v for k, v in options.items() if v is not None})
    if cfg.shift:
        from regbench.datasets import shift as shift_sets
        splits = dataclasses.replace(splits, shift=shift_sets.load(cfg.shift, data_dir, splits))
    return splits


def worker_command(args, default_data_dir: str, argv: list[str] | None = None) -> int:
    """Join a benchmark planned in a shared storage: claim and run its trials until none is left. With --per-gpu N,
    start N such workers per visible GPU instead (regbench/launch.py) once the storage and benchmark check out."""
    from regbench import runner
    from regbench.store import open_storage

    per_gpu = getattr(args, "per_gpu", 1)
    if per_gpu < 1:
        raise ConfigError(f"--per-gpu must be at least 1, got {per_gpu}")
    name, deprecated = benchmark_name(args, "worker")
    if per_gpu > 1:
        from regbench.launch import run_per_device

        bench = load_benchmark(open_storage(args.storage), name)  # one line here, not one per child
        if deprecated:
            print(deprecated, file=sys.stderr)
        child = [*_without_option(_without_option(argv or [], "--per-gpu"), "--benchmark"), "--name", name]
        uri = tracking_uri_for(getattr(args, "tracking_uri", None), bench)
        if uri is None:  # said once here, not once per child
            print(not_mirrored(args.storage, name), file=sys.stderr)
        return run_per_device(child, per_gpu)

    data_dir = Path(args.data_dir or default_data_dir).expanduser()
    # A worker's checkpoints are local to its machine: a trial retried by a worker on another machine starts over.
    checkpoint_dir = Path(getattr(args, "checkpoint_dir", None) or data_dir.parent / "regbench-checkpoints")
    if not getattr(args, "checkpoint_dir", None):  # the default, next to --data-dir: usable before any trial trains
        from regbench.arguments import OUTPUT_DIR
        OUTPUT_DIR.check(str(checkpoint_dir), "--checkpoint-dir (default: next to the --data-dir)")
    checkpoints = inputs.checkpoint_options(args, checkpoint_dir.expanduser())
    storage = open_storage(args.storage)
    bench = load_benchmark(storage, name)
    if deprecated and not os.environ.get("REGBENCH_PER_GPU_CHILD"):
        print(deprecated, file=sys.stderr)
    apply_heartbeat(storage, bench)
    if args.device:
        inputs.check_device(args.device)
        bench.base = bench.base.replace(device=args.device)
    splits = load_splits(bench.base, data_dir)
    want = bench.extra.get("split_hash")
    if want and splits.split_hash != want:
        raise ConfigError(f"this machine's {bench.base.dataset} data gives split {splits.split_hash[:12]}, the "
                          f"benchmark was planned on {want[:12]}; point --data-dir at the same dataset files")
    tracking_uri = tracking_uri_for(getattr(args, "tracking_uri", None), bench)
    if tracking_uri is None and not os.environ.get("REGBENCH_PER_GPU_CHILD"):
        print(not_mirrored(args.storage, name), file=sys.stderr)
    work(storage, bench, splits, tracking_uri, quiet=args.quiet, checkpoints=checkpoints,
         worker=runner.worker_identity())
    print(f"worker: benchmark {bench.name!r} has no work left")
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def sync_mlflow_command(args) -> int:
    """Mirror every trial of a benchmark that MLflow lacks (after the server was down during a run)."""
    from regbench import tracking

    storage, name, bench = _stored_benchmark(args)
    uri = tracking_uri_for(getattr(args, "tracking_uri", None), bench, Path(args.out) if args.out else None)
    if uri is None:
        raise ConfigError("no MLflow to sync to: pass --tracking-uri URI, set MLFLOW_TRACKING_URI or pass the run's "
                          "OUT dir")
    reason = tracking.unreachable(uri)
    if reason is not None:
        raise ConfigError(f"MLflow at {uri} is unreachable ({reason}); start it, then run sync-mlflow again")
    tracker = tracking.Tracker(uri, experiment=name)
    before = len(tracker.client.search_runs([tracker.experiment_id], max_results=5000))
    tracking.mirror_benchmark(storage, tracker, bench)
    tracker.close()
    after = len(tracker.client.search_runs([tracker.experiment_id], max_results=5000))
    print(f"sync-mlflow: {after - before} runs mirrored to {uri} (experiment {name!r}, {after} runs in all)")
    return 0


def status_command(args) -> int:
    """Per method: tuning and final runs done, running, failed, pruned and remaining."""
    from regbench import status

    storage, name, bench = _stored_benchmark(args)
    print(f"benchmark {name}: {len(bench.methods)} methods, seeds {bench.seeds}, "
          + (f"{bench.protocol.trials} tuning trials" if bench.protocol.trials else "no tuning")
          + (f", {bench.protocol.budget_epochs} tuning epochs" if bench.protocol.budget_epochs else ""))
    from regbench.plans import history_lines

    for row in [*history_lines(bench), *status.progress(storage, bench)]:
        print(row)
    print(status.time_left(storage, bench))
    return 0


def _stored_benchmark(args):
    """(storage, name, Benchmark) for a command given OUT and/or --storage/--name (status, sync-mlflow)."""
    storage, pointed = open_store(args.out, args.storage)
    name = _only_benchmark(storage, args.name or pointed)
    return storage, name, load_benchmark(storage, name)


def open_store(out, storage_url: str | None):
    """(storage, benchmark name or None) the same way for status, report, export and sync-mlflow: ``--storage URL``,
    else OUT's own store (OUT/regbench.db), else the shared store a `regbench run --storage URL --out OUT` planned
    (OUT/store.json, which also names the benchmark)."""
    from regbench.store import STORE_FILE, default_storage_url, open_storage

    if storage_url:
        from regbench.statefiles import check_existing_store

        check_existing_store(storage_url, "--storage")  # read-only commands never create or fill a store
        return open_storage(storage_url), None
    out = Path(out or ".")
    if (out / STORE_FILE).is_file():
        from regbench.statefiles import check_existing_store

        check_existing_store(default_storage_url(out), f"{out}'s store")  # opened as it is: nothing created
        return open_storage(default_storage_url(out)), None
    if os.path.lexists(out / POINTER_FILE):
        from regbench.statefiles import check_existing_store, read_pointer

        url, pointed = read_pointer(out)  # schema-checked; an old relative SQLite path is taken relative to OUT
        if "***" in url:
            raise ConfigError(f"{out} was planned on {url}, whose password is not kept there; pass --storage URL")
        check_existing_store(url, f"the store {out / POINTER_FILE} names")  # never creates one in the cwd
        return open_storage(url), pointed
    raise ConfigError(f"{out} holds no store ({STORE_FILE}); pass the --out of a `regbench run` or --storage URL")


def _only_benchmark(storage, name: str | None) -> str:
    import optuna

    if name is not None:
        return name
    names = [s for s in optuna.get_all_study_names(storage) if ":" not in s]
    if len(names) != 1:
        raise ConfigError(f"the store holds benchmarks {', '.join(names) or 'none'}; choose one with --name")
    return names[0]


def _describe_space(cls) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study().ask()  # an in-memory study: records the distributions of search_space's suggests
    cls.search_space(trial)
    parts = []
    for key, dist in trial.distributions.items():
        if hasattr(dist, "choices"):
            parts.append(f"{key} ∈ {{{', '.join(map(str, dist.choices))}}}")
        else:
            parts.append(f"{key} ∈ [{dist.low:g}, {dist.high:g}]{' log' if getattr(dist, 'log', False) else ''}")
    return "; ".join(parts) or "nothing to tune"


def list_command(what: str) -> int:
    if what == "methods":
        for name in registry.method_names():
            try:
                cls = registry.method_class(name)
            except RegbenchError as exc:
                print(f"{name}  (broken plugin: {exc})")
                continue
            print(f"{name}: {cls.description}" + (f"  [{cls.paper}]" if cls.paper else ""))
            hp = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "none"
            print(f"    defaults: {hp}")
            print(f"    search space: {_describe_space(cls)}")
        print("composites: join methods with '+', e.g. ses+spectral_norm or shade+dropout: the sum of their losses, "
              "hparams namespaced by part (--set ses+spectral_norm.ses.beta=0.6)")
    elif what == "datasets":
        for name in registry.dataset_names():
            ds = registry.dataset(name)
            print(f"{name}: {ds.description}")
            print(f"    {ds.num_classes} classes, input {tuple(ds.input_shape)}, default model {ds.default_model}")
    else:
        from regbench import models

        print("built-in: " + ", ".join(models.list_models()))
        print("timm: any name from timm.list_models(), e.g. resnet18 (CIFAR stem on 32x32 inputs)")
        print("layer rules (which layers a method hooks):")
        for rule, text in models.LAYER_RULES.items():
            print(f"    {rule}: {text}")
    return 0


def _report_store(out: Path, storage_url: str | None, name: str | None, several: bool = False):
    """The store of an output dir (or --storage) and the benchmark(s) to report (``several``: every benchmark of the
    store when no --name); one clear line when either is missing."""
    import optuna

    storage, pointed = open_store(out, storage_url)
    name = name or pointed
    if several and name is None:
        names = [s for s in optuna.get_all_study_names(storage) if ":" not in s]
        if not names:
            raise ConfigError(f"{out} holds no benchmark; run `regbench run` there first")
        return storage, names
    return storage, [_only_benchmark(storage, name)]


def report_command(args) -> int:
    """Regenerate each OUT's leaderboard and figures from its store; with --summary, rank across them."""
    from regbench import report

    outs = [Path(o) for o in args.out]
    if not outs:  # report --storage URL [--name NAME]: the leaderboard goes where `regbench run` would put it
        if not args.storage:
            raise ConfigError("report: give the OUT dir of a `regbench run`, or --storage URL (and --name NAME)")
        outs = [Path("runs") / _only_benchmark(open_store(None, args.storage)[0], args.name)]
    if args.storage and len(outs) > 1:
        raise ConfigError("--storage names one store: give one OUT with it, or drop --storage to read each OUT's own")
    if len(outs) > 1 and not args.summary:
        raise ConfigError(f"{len(outs)} output dirs given: add --summary DIR to rank methods across them")
    if not args.margin > 0:
        raise ConfigError(f"--margin {args.margin} must be > 0 (percentage points, e.g. 0.5)")
    from regbench.statefiles import check_output_entries

    for out in outs:  # the leaderboard and figures go there: a folder named leaderboard.md is refused before any work
        check_output_entries(out)
    if args.summary:
        check_output_entries(Path(args.summary), "--summary")
    stores = [(out, *_report_store(out, args.storage, args.name, several=bool(args.summary))) for out in outs]
    entries = []  # the summary's inputs, checked (nothing in common: one line, exit 2) before anything is written
    if args.summary:
        from regbench import summary as _summary

        entries = [report.summary_input(storage, n) for _, storage, names in stores for n in names]
        _summary.check(entries)
    latex = bool(getattr(args, "latex", False))
    for out, storage, names in stores:  # all checked above, before anything is written
        if args.summary and len(names) > 1:  # a store of several benchmarks: all join the summary, none overwrites
            print(f"{out}: {len(names)} benchmarks ({', '.join(names)}) go into the summary; regenerate one's "
                  f"leaderboard with --name")
            continue
        name = names[0]
        paths = report.write_report(storage, name, out, margin_pp=args.margin, latex=latex)
        uri = tracking_uri_for(getattr(args, "tracking_uri", None), load_benchmark(storage, name), out,
                               default_in_out=False)
        if uri is None:
            print(f"regbench: note: the leaderboard is not attached to MLflow (no --tracking-uri, MLFLOW_TRACKING_URI "
                  f"is unset and {name!r} recorded none usable here); pass --tracking-uri URI to attach it",
                  file=sys.stderr)
        else:
            _tracking.attach_report(uri, name, paths, _warn)
        if not args.summary:
            print(paths[0].read_text())
        print(f"Leaderboard: {paths[0].resolve()} ({sum(p.suffix == '.png' for p in paths)} figures in "
              f"{(out / 'figures').resolve()})" + (f"; LaTeX: {paths[1].resolve()}" if latex else ""))
    if args.summary:
        paths = report.write_summary(entries, Path(args.summary), latex=latex)
        print(paths[0].read_text())
        print(f"Summary: {paths[0]}")
    return 0


def export_command(args) -> int:
    """OUT/results.csv (or .parquet): one row per final run, for pandas."""
    from regbench import (
        tidy,  # not report: export needs neither the statistics nor the figures
    )

    out = Path(args.out)
    from regbench.statefiles import check_output_entries

    check_output_entries(out)
    storage, (name,) = _report_store(out, args.storage, args.name)
    path = tidy.write_export(storage, name, out, args.format)
    print(f"Wrote {path}")
    return 0
