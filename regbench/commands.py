"""What each CLI command does: resolve options into RunConfigs at the edge, then call study/engine/report."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from regbench import registry
from regbench.config import GENERIC_RECIPE, RECIPES, RunConfig, parse_sets
from regbench.errors import ConfigError, RegbenchError

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _parse_methods(text: str) -> list[str]:
    names = ["+".join(part.strip() for part in n.split("+")) for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--methods {text!r} names no method; e.g. --methods ses,shade "
                          f"(choices: {', '.join(registry.method_names())})")
    seen: list[str] = []
    for n in names:
        registry.method_class(n)  # unknown names fail here, with the valid choices
        if n not in seen:
            seen.append(n)
    return seen if "baseline" in seen else ["baseline", *seen]


def _parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is neither a count (3) nor a list (0,1,7)") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give at least one seed, all distinct and >= 0")
    return seeds


def _check_device(device: str) -> None:
    import torch

    if device == "auto" or device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        return
    raise ConfigError(f"--device {device!r} is not one of: auto, cpu, cuda, cuda:N")


def _check_attach(method_name: str, hparams: dict, model_name: str, dataset) -> None:
    """Attach the method to a throwaway model before anything is written, so a layer rule that is unknown or selects
    nothing on this model, or a model option the model rejects, fails now in one line instead of mid-benchmark."""
    from regbench import engine, models

    method = registry.build_method(method_name, hparams)
    try:
        model = models.create_model(model_name, dataset.num_classes, dataset.input_shape, **method.model_options())
        capture = engine.ActivationCapture(model)
        method.attach(model, engine.ModelContext(model, capture, dataset.num_classes, dataset.input_shape))
        method.detach(model)
        capture.remove()
    except RegbenchError as exc:
        raise type(exc)(f"method {method_name!r} on model {model_name!r}: {exc}") from None


def run_command(args, default_data_dir: str, command_line: str) -> int:
    from regbench import models

    methods = _parse_methods(args.methods)
    overrides = parse_sets(args.sets, methods)
    hparams = {m: registry.method_class(m).resolve(overrides.get(m, {})) for m in methods}
    dataset = registry.dataset(args.dataset)
    model = args.model or dataset.default_model
    models.create_model(model, dataset.num_classes, dataset.input_shape)  # fails early on an unknown/unfit model
    for m in methods:
        _check_attach(m, hparams[m], model, dataset)
    if args.shift:
        from regbench.datasets import shift as shift_sets
        shift_sets.check(args.shift, args.dataset)
    seeds = _parse_seeds(args.seeds)
    _check_device(args.device)
    recipe = {**GENERIC_RECIPE, **RECIPES.get(args.dataset, {})}
    for option in ("epochs", "batch_size", "lr", "optimizer", "schedule"):
        if getattr(args, option) is not None:
            recipe[option] = getattr(args, option)
    data_dir = Path(args.data_dir or default_data_dir).expanduser()
    base = RunConfig(method="baseline", dataset=args.dataset, model=model, train_size=args.train_size, shift=args.shift,
                     weight_decay=args.weight_decay, device=args.device, data_dir=str(data_dir), **recipe)
    name = args.name or f"{args.dataset}-{model}"
    if not _NAME_OK.match(name):
        raise ConfigError(f"benchmark name {name!r} may use letters, digits, '_', '-' and '.' only; pass --name")
    out = Path(args.out or Path("runs") / name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    storage_url = args.storage
    storage = None
    if storage_url:  # opened before anything is written, so a bad URL leaves the output dir untouched
        from regbench.store import open_storage, safe_url
        storage = open_storage(storage_url)
        command_line = command_line.replace(storage_url, safe_url(storage_url))  # the header must not leak it
    splits = dataset.load(data_dir, split_seed=base.split_seed, train_size=args.train_size)
    if args.shift:
        import dataclasses

        from regbench.datasets import shift as shift_sets
        splits = dataclasses.replace(splits, shift=shift_sets.load(args.shift, data_dir, splits))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output dir {out}: {exc.strerror}; choose another --out") from None

    from regbench import report, store, study, tracking
    from regbench.store import OutputLock, default_storage_url, open_storage

    progress = not args.quiet and sys.stderr.isatty()
    say = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with OutputLock(out):
        if storage is None:
            storage_url = default_storage_url(out)
            storage = open_storage(storage_url)
        splits.save_indices(out / "splits" / f"{args.dataset}-{splits.split_hash[:12]}.json")
        configs = {m: [base.replace(method=m, hparams=hparams[m], seed=s) for s in seeds] for m in methods}
        plan = study.Plan(benchmark=name, command=command_line, configs=configs, seeds=seeds,
                          extra={"split_hash": splits.split_hash, "storage": store.safe_url(storage_url)})
        study.save_spec(storage, plan)
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(out)
        tracker = tracking.Tracker(tracking_uri, experiment=name)
        total = len(methods) * len(seeds)
        counter = {"done": 0}
        import optuna

        for method in methods:
            st = optuna.create_study(study_name=store.final_study_name(name, method), storage=storage,
                                     direction="maximize", load_if_exists=True)
            counts = study.enqueue_missing(st, configs[method], owns_storage=args.storage is None)
            counter["done"] += counts["done"]
            if counts["done"]:
                say(f"{method}: {counts['done']} of {len(seeds)} seeds already in the store, skipped")

            def run_one(trial, cfg, st=st):
                result = study.run_trial(st, trial, cfg, splits, progress=progress)
                counter["done"] += 1
                if result is None:
                    say(f"[{counter['done']}/{total}] {cfg.method} seed {cfg.seed}: FAILED "
                        f"({trial.user_attrs.get('fail_reason', '')})")
                    return
                _mirror_trial(tracker, st.study_name, trial.number, trial.user_attrs)
                m = result.metrics
                say(f"[{counter['done']}/{total}] {cfg.method} seed {cfg.seed}: test {m['test_acc']:.2%}, "
                    f"val {m['val_acc']:.2%}, {result.seconds:.1f} s")

            study.drain(st, run_one)
        _mirror_missing(storage, tracker, name, plan)
        path = report.write_leaderboard(storage, name, out)
        tracker.log_artifact(None, path)
        tracker.close()
    print(path.read_text())
    print(f"Leaderboard: {path}")
    print(f"Store: {store.safe_url(storage_url)}")
    print(f"MLflow UI: {tracking.ui_command(tracking_uri)}")
    return 0


def _mirror_trial(tracker, study_name: str, number: int, attrs: dict) -> None:
    import json

    tracker.log_trial(study_name, number, json.loads(attrs["config"]), attrs["config_key"], attrs["metrics"],
                      attrs["history"], attrs.get("env", {}), started=attrs["timings"]["started"],
                      seconds=attrs["timings"]["seconds"])


def _mirror_missing(storage, tracker, benchmark: str, plan) -> None:
    """Mirror every finished run of this plan that MLflow lacks (e.g. after a crash between store and mirror)."""
    from regbench import store

    for method in plan.configs:
        for t in store.final_trials(storage, benchmark, method, plan.configs[method][0].group_key()):
            _mirror_trial(tracker, store.final_study_name(benchmark, method), t.number, t.user_attrs)
        tracker.parent(method, plan.configs[method][0].hparams)


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


def report_command(args) -> int:
    import optuna

    from regbench import report
    from regbench.store import STORE_FILE, default_storage_url, open_storage

    out = Path(args.out)
    if not args.storage and not (out / STORE_FILE).is_file():
        raise ConfigError(f"{out} holds no store ({STORE_FILE}); pass the --out of a `regbench run` or --storage URL")
    storage = open_storage(args.storage or default_storage_url(out))
    name = args.name
    if name is None:
        names = [s for s in optuna.get_all_study_names(storage) if ":" not in s]
        if len(names) != 1:
            raise ConfigError(f"the store holds benchmarks {', '.join(names) or 'none'}; choose one with --name")
        name = names[0]
    path = report.write_leaderboard(storage, name, out)
    print(path.read_text())
    print(f"Leaderboard: {path}")
    return 0
