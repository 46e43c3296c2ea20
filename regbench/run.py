"""`regbench run`: a request resolved and checked at the edge, its data, its plan, the work, the report.

Every check that can fail runs before anything is written (a bad flag leaves the output dir as it was), and the
steps read top to bottom in ``run_command``.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from regbench import registry
from regbench.commands import apply_heartbeat, tracking_uri_for, work, write_report
from regbench.config import GENERIC_RECIPE, RECIPES, RunConfig, parse_sets
from regbench.errors import ConfigError
from regbench.inputs import (
    NAME_OK,
    check_attach,
    check_checkpoints,
    check_device,
    checkpoint_options,
    parse_methods,
    typed_sets,
)
from regbench.limits import parse_seeds
from regbench.plans import tuning_rules
from regbench.statefiles import write_pointer
from regbench.store import safe_url


@dataclass
class RunRequest:
    """What `regbench run` was asked, typed and checked: no argparse namespace travels past ``resolve``."""

    methods: list[str]
    overrides: dict                 # method -> {hparam: text} from --set
    dataset: object                 # the dataset plugin
    model: str
    seeds: list[int]
    rules: object                   # protocol.TuningRules
    base: RunConfig                 # the shared recipe (method, hparams and seed are set per run)
    name: str
    out: Path
    data_dir: Path
    augment_flag: str | None        # --augment as given (None: the dataset's default, applied by the dataset)
    storage_url: str | None
    storage: object | None          # opened at once when --storage is given: a bad URL fails before any write
    command_line: str
    supersede: bool
    plan_only: bool
    quiet: bool
    parallel_seeds: int
    tracking_uri: str | None        # --tracking-uri as given
    checkpoint_every_seconds: float
    keep_checkpoints: bool


def run_command(args, default_data_dir: str, command_line: str) -> int:
    from regbench.store import OutputLock

    request = resolve(args, default_data_dir, command_line)   # every flag checked; nothing opened or written
    splits = load_data(request)                                # the split (its hash keyed) and the shift set
    bench = plan(request)                                      # search spaces, fair tuning, the name's protocol
    prepare_output_dir(request.out)
    with OutputLock(request.out):
        storage, storage_url, tracking_uri = record_plan(request, bench, splits)
        if request.plan_only:
            print(f"Planned benchmark {request.name!r} in {safe_url(storage_url)}; join it with: regbench worker "
                  f"--storage {safe_url(storage_url)} --name {request.name}  (or regbench launch --name {request.name} "
                  f"--workers N ...); runs are mirrored to MLflow at {safe_url(tracking_uri)}")
            return 0
        # Checkpoints live with the store: a rerun of this command (the retry of a killed trial) finds them.
        work(storage, bench, splits, tracking_uri, quiet=request.quiet, parallel_seeds=request.parallel_seeds,
             checkpoints=checkpoint_settings(request))
        path = write_report(storage, request.name, request.out, tracking_uri)
    print_outcome(path, storage_url, tracking_uri)
    return 0


def resolve(args, default_data_dir: str, command_line: str) -> RunRequest:
    """The flags as a typed request, each checked (methods and their --set values, dataset, model, layer rules, shift
    set, seeds, tuning rules, checkpoints, device, name, output entries, storage URL)."""
    from regbench import models
    from regbench.datasets.base import check_augment
    from regbench.statefiles import check_output_entries

    methods = parse_methods(args.methods)
    overrides = parse_sets(args.sets, methods)
    hparams = {m: registry.method_class(m).resolve(overrides.get(m, {})) for m in methods}
    dataset = registry.dataset(args.dataset)
    augment = args.augment or getattr(dataset, "default_augment", "none")
    check_augment(augment, dataset.input_shape, args.dataset)  # e.g. crop_flip on 1-D signals: fail before any work
    model = args.model or dataset.default_model
    models.create_model(model, dataset.num_classes, dataset.input_shape)  # fails early on an unknown/unfit model
    for m in methods:
        check_attach(m, hparams[m], model, dataset)
    if args.shift:
        from regbench.datasets import shift as shift_sets
        shift_sets.check(args.shift, args.dataset)
    seeds = parse_seeds(args.seeds)
    rules = tuning_rules(args, methods)  # bad --trials/--budget-epochs/… fail before any storage is opened
    checkpoint_options(args, Path("."))
    if args.parallel_seeds > len(seeds):  # its range (1..) is checked when parsed (limits.py)
        raise ConfigError(f"--parallel-seeds {args.parallel_seeds} is more than the {len(seeds)} seed(s) queued "
                          f"(--seeds {args.seeds}); use --parallel-seeds {len(seeds)} or more --seeds")
    check_device(args.device)
    recipe = {**GENERIC_RECIPE, **RECIPES.get(args.dataset, {})}
    recipe.update({k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule")
                   if getattr(args, k) is not None})
    data_dir = Path(args.data_dir or default_data_dir).expanduser()
    base = RunConfig(method="baseline", dataset=args.dataset, model=model, train_size=args.train_size, shift=args.shift,
                     train_per_class=args.train_per_class, augment=augment, train_acc_sample=args.train_acc_sample,
                     weight_decay=args.weight_decay, device=args.device, data_dir=str(data_dir),
                     compile=args.compile, **recipe)
    name = args.name or f"{args.dataset}-{model}"
    if not NAME_OK.match(name):
        raise ConfigError(f"benchmark name {name!r} may use letters, digits, '_', '-' and '.' only; pass --name")
    out = Path(args.out or Path("runs") / name)
    check_output_entries(out)  # OUT a file, OUT/regbench.db a folder, a symlink loop, ...: refused before any work
    storage = None
    if args.storage:  # opened before anything is written, so a bad URL leaves the output dir untouched
        from regbench.store import open_storage
        storage = open_storage(args.storage)
        command_line = command_line.replace(args.storage, safe_url(args.storage))  # the header must not leak it
    return RunRequest(methods=methods, overrides=overrides, dataset=dataset, model=model, seeds=seeds, rules=rules,
                      base=base, name=name, out=out, data_dir=data_dir, augment_flag=args.augment,
                      storage_url=args.storage, storage=storage,
                      command_line=command_line, supersede=args.supersede, plan_only=args.plan_only,
                      quiet=args.quiet, parallel_seeds=args.parallel_seeds, tracking_uri=args.tracking_uri,
                      checkpoint_every_seconds=args.checkpoint_every_seconds, keep_checkpoints=args.keep_checkpoints)


def load_data(request: RunRequest):
    """The dataset's splits as this benchmark uses them; the split's hash (and the augmentation the data applies)
    become part of every run's config, so a run is identified by the exact indices it trained on."""
    base = request.base
    options = {"train_per_class": base.train_per_class, "augment": request.augment_flag}  # only those given
    splits = request.dataset.load(request.data_dir, split_seed=base.split_seed, train_size=base.train_size,
                                  **{k: v for k, v in options.items() if v is not None})
    sample, n_train = base.train_acc_sample, len(splits.y_train)
    if sample is not None and sample > n_train:  # a relation between values: the sample is drawn from the split
        raise ConfigError(f"--train-acc-sample {sample} is more than the {n_train} images of the train split; pass "
                          f"at most {n_train} (or leave it out: the whole split)")
    request.base = base.replace(split_hash=splits.split_hash, augment=getattr(splits, "augment", "none"))
    if base.shift:
        from regbench.datasets import shift as shift_sets
        splits = dataclasses.replace(splits, shift=shift_sets.load(base.shift, request.data_dir, splits))
    return splits


def plan(request: RunRequest):
    """The benchmark this command describes, checked against what its name already holds: an invalid hparam from a
    search space, an arm left nothing to tune, or a rerun that changes the protocol the name binds (without
    --supersede) fails here, before any write."""
    from regbench import plans, protocol

    bench = protocol.Benchmark(name=request.name, base=request.base, seeds=request.seeds, protocol=request.rules,
                               fixed={m: typed_sets(m, request.overrides.get(m, {})) for m in request.methods},
                               command=request.command_line)
    protocol.check_search_spaces(bench, check=lambda m, hp: check_attach(m, hp, request.model, request.dataset))
    plans.check_fair(bench)
    plans.check_rerun(plans.stored_spec(request.storage, request.out, request.name), bench, request.supersede)
    return bench


def prepare_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output dir {out}: {exc.strerror}; choose another --out") from None
    check_checkpoints(out / "checkpoints")


def record_plan(request: RunRequest, bench, splits):
    """Under the output dir's lock: the store opened (OUT's own unless --storage), the split's indices saved, the spec
    written (superseding the old plan when asked), dead trials of a local store failed and requeued. Returns
    (storage, storage URL, MLflow URI)."""
    from regbench import plans, protocol, runner
    from regbench.store import default_storage_url, load_spec, open_storage

    storage, storage_url = request.storage, request.storage_url
    owned = storage is None
    if owned:
        storage_url = default_storage_url(request.out)
        storage = open_storage(storage_url)
    splits.save_indices(request.out / "splits" / f"{request.base.dataset}-{splits.split_hash[:12]}.json")
    tracking_uri = tracking_uri_for(request.tracking_uri, out=request.out)
    bench.extra = {"split_hash": splits.split_hash, "storage": safe_url(storage_url), "tracking_uri": safe_url(tracking_uri)}
    previous = load_spec(storage, request.name) or {}
    if "heartbeat" in previous:  # a stored heartbeat setting is the benchmark's, not this command's
        bench.extra["heartbeat"] = previous["heartbeat"]
    # the protocol is checked again under the lock
    superseding = plans.adopt(previous, bench, *plans.check_rerun(previous, bench, request.supersede),
                              request.supersede)
    apply_heartbeat(storage, bench)
    protocol.save_spec(storage, bench)  # first: a worker of a superseded plan stops before its next claim
    if not owned:  # OUT names the shared store, so status/report/export OUT find it (the password is not kept)
        write_pointer(request.out, storage_url, request.name)
    if owned:  # we hold the output dir's lock, so a RUNNING trial in its store belongs to a dead process
        runner.fail_dead_trials(storage, protocol.study_names(bench))
    if superseding:  # the old plan's queued runs are cancelled, never trained; what was superseded is said
        print(plans.supersede(storage, previous, bench, owned), file=sys.stderr, flush=True)
        protocol.save_spec(storage, bench)
        plans.retire_mlflow(tracking_uri, bench, lambda msg: print(msg, file=sys.stderr, flush=True))
    return storage, storage_url, tracking_uri


def checkpoint_settings(request: RunRequest) -> dict:
    return {"checkpoint_dir": request.out / "checkpoints", "checkpoint_seconds": request.checkpoint_every_seconds,
            "keep_checkpoints": request.keep_checkpoints}


def print_outcome(path: Path, storage_url: str, tracking_uri: str | None) -> None:
    from regbench import tracking

    print(path.read_text())
    print(f"Leaderboard: {path}")
    print(f"Store: {safe_url(storage_url)}")
    print(f"MLflow UI: {tracking.ui_command(tracking_uri)}")
