"""The protocol: what a benchmark is and how each method is tuned, selected and rerun (docs/architecture.md).

A benchmark (``Benchmark``) is a shared recipe, the methods with their fixed hparams, the final seeds and the tuning
rules (``TuningRules``: a trial and/or epoch budget per method, the pruner, the objective). Its spec is stored in
the benchmark's own study (``record.spec_study_name``), so workers and reports need nothing else:

* each method is tuned in its own study, ``record.tune_study_name(benchmark, method, ident)``: TPE over the method's
  declared search space (plus the shared lr and weight decay when shared tuning is on), on a validation objective;
  ``ident`` hashes everything the tuning depends on, so changing a setting starts a new study instead of mixing;
* the best tuning trial on validation is the method's selected configuration, recorded on the benchmark's study;
* the selection is rerun over the seeds as enqueued trials of ``record.final_study_name(benchmark, method)``; the
  seeds are shared across methods, so comparisons are paired.

Claiming and training trials is ``regbench.runner``; the status lines are ``regbench.status``.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import optuna

from regbench import dashboard, record, registry
from regbench.config import RunConfig
from regbench.errors import ConfigError, RegbenchError

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own one line per trial

TUNE_SEED = 10_000              # training seed of every tuning trial: distinct from the final seeds 0..N-1
OBJECTIVES = {"val_acc": "maximize", "val_nll": "minimize"}
PRUNERS = ("none", "median", "hyperband")
LATER_RULES = {"untuned": (), "startup_trials": None, "ranges": {}}  # TuningRules fields added after stores existed,
                                                                     # with the value old specs mean
SHARED_PREFIX = "shared."       # shared training hparams in a tuning trial's params: shared.lr, shared.weight_decay


@dataclass(frozen=True)
class TuningRules:
    """How every method of a benchmark is tuned and selected: the same budget for each arm."""

    trials: int = 0                     # tuning trials per method; 0 with no epoch budget = defaults only
    budget_epochs: int | None = None    # or: tune until this many training epochs are spent per method
    pruner: str = "median"
    objective: str = "val_acc"
    tune_shared: bool = False           # also tune lr and weight decay, for every method including baseline
    oracle: bool = False                # also evaluate tuning trials on test, for an oracle table labelled as such
    sampler_seed: int = 0
    untuned: tuple[str, ...] = ()       # arms run with their defaults on purpose (--untuned): an unequal budget
    startup_trials: int | None = None   # TPE's random start-up trials per study (None: Optuna's default)
    # a method's searched numeric range moved, {method: {hparam: [low, high]}}: the declared space's scale and
    # distribution kept, its bounds replaced (a paper suite that searches a range of its own)
    ranges: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "untuned", tuple(self.untuned))  # a stored spec holds a JSON list
        object.__setattr__(self, "ranges", {m: {k: [float(lo), float(hi)] for k, (lo, hi) in r.items()}
                                            for m, r in self.ranges.items()})
        if self.startup_trials is not None and self.startup_trials < 0:
            raise ConfigError(f"startup trials must be >= 0, got {self.startup_trials}")
        for method, bounds in self.ranges.items():
            for name, (low, high) in bounds.items():
                if not low < high:
                    raise ConfigError(f"the searched range of {method}.{name} is empty ({low} >= {high}); give "
                                      f"low < high")
        if self.trials < 0:
            raise ConfigError(f"--trials must be >= 0 (0 = defaults only), got {self.trials}")
        if self.budget_epochs is not None and self.budget_epochs < 1:
            raise ConfigError(f"--budget-epochs must be at least 1, got {self.budget_epochs}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"unknown pruner {self.pruner!r}; choose one of: {', '.join(PRUNERS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")

    @property
    def tunes(self) -> bool:
        return self.trials > 0 or self.budget_epochs is not None

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]


@dataclass
class Benchmark:
    """What one ``regbench run`` asked for; stored as the spec so workers and reports need nothing else."""

    name: str
    base: RunConfig                         # the shared recipe, dataset and split (method/hparams/seed are set per run)
    fixed: dict[str, dict]                  # method -> hparams fixed by --set (typed), never tuned
    seeds: list[int]
    protocol: TuningRules = field(default_factory=TuningRules)
    command: str = ""
    extra: dict = field(default_factory=dict)
    plan: int = 0                           # 0 = the first plan under this name; +1 each time a plan supersedes it
    _space_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _defaults_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def methods(self) -> list[str]:
        return list(self.fixed)

    def ident(self, method: str) -> str:
        """Hash of everything a method's tuning depends on (not the seeds, not the trial count: those may grow). A
        superseding plan (``plan`` > 0) tunes in studies of its own, so no trial of a superseded plan is reused."""
        keyed = self.base.replace(method=method, hparams={}, seed=0).keyed()
        proto = {k: v for k, v in asdict(self.protocol).items() if k not in ("trials", "budget_epochs", "oracle")
                 and not (k in LATER_RULES and v == LATER_RULES[k])}  # fields added later: old idents stay valid
        blob = {"run": keyed, "fixed": self.fixed[method], "protocol": proto}
        if self.plan:
            blob["plan"] = self.plan
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]

    def tunes(self, method: str) -> bool:
        """Tuning a method with nothing to search (baseline without shared tuning) would repeat one run: skip it; an
        arm named by ``--untuned`` runs its defaults."""
        if not self.protocol.tunes or method in self.protocol.untuned:
            return False
        if method not in self._space_cache:
            self._space_cache[method] = space_keys(self, method)
        return bool(self._space_cache[method])

    def tune_study_name(self, method: str) -> str:
        return record.tune_study_name(self.name, method, self.ident(method))

    def default_hparams(self, method: str) -> dict:
        if method in self._defaults_cache:
            return dict(self._defaults_cache[method])
        return registry.method_class(method).resolve(self.fixed[method])

    def final_configs(self, method: str, hparams: dict, shared: dict) -> list[RunConfig]:
        return [self.base.replace(method=method, hparams=hparams, seed=s, eval_test=True, **shared)
                for s in self.seeds]

    def spec(self) -> dict:
        return {
            "benchmark": self.name, "command": self.command, "seeds": self.seeds, "base": self.base.to_json(),
            "protocol": {k: v for k, v in asdict(self.protocol).items()  # a later field at its default is left
                         if not (k in LATER_RULES and v == LATER_RULES[k])},  # out: old and new specs read alike
            "dataset": self.base.dataset, "model": self.base.model,
            "epochs": self.base.epochs, "shift": self.base.shift,
            "methods": {m: {"fixed": self.fixed[m], "ident": self.ident(m), "hparams": self.default_hparams(m),
                            "tune_study": self.tune_study_name(m) if self.tunes(m) else None,
                            "space": space_keys(self, m)}
                        for m in self.methods},
            **({record.PLAN: self.plan} if self.plan else {}),
            **self.extra,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Benchmark:
        return cls(name=spec["benchmark"], base=RunConfig.from_json(spec["base"]),
                   fixed={m: info["fixed"] for m, info in spec["methods"].items()}, seeds=list(spec["seeds"]),
                   protocol=TuningRules(**spec["protocol"]), command=spec.get("command", ""),
                   extra={k: spec[k] for k in ("split_hash", "storage", "tracking_uri", "heartbeat",
                                               record.SUPERSEDED_PLANS) if k in spec},
                   plan=int(spec.get(record.PLAN, 0)),
                   # what the plan stored: reading a benchmark (status, report, export) imports no method's code
                   _space_cache={m: list(i["space"]) for m, i in spec["methods"].items() if "space" in i},
                   _defaults_cache={m: dict(i["hparams"]) for m, i in spec["methods"].items() if "hparams" in i})


# ---- search spaces ------------------------------------------------------------------------------------------------

class _FixedTrial:
    """A trial seen through --set: a fixed hparam returns its value without being suggested, so the sampler only
    searches what is free (a value outside the declared range or choices is still allowed, as the user asked)."""

    def __init__(self, trial, fixed: dict, ranges: dict | None = None):
        self._trial, self._fixed, self._ranges = trial, fixed, ranges or {}

    def _suggest(self, kind, name, *args, **kwargs):
        if name in self._fixed:
            return self._fixed[name]
        return getattr(self._trial, kind)(name, *args, **kwargs)

    def suggest_float(self, name, low, high, **k):
        low, high = self._ranges.get(name, (low, high))  # TuningRules.ranges: the bounds moved, the scale kept
        return self._suggest("suggest_float", name, low, high, **k)

    def suggest_int(self, name, low, high, **k):
        low, high = (int(v) for v in self._ranges.get(name, (low, high)))
        return self._suggest("suggest_int", name, low, high, **k)

    def suggest_categorical(self, name, *a, **k):
        return self._suggest("suggest_categorical", name, *a, **k)


def suggest(bench: Benchmark, method: str, trial) -> tuple[dict, dict]:
    """(method hparams, shared recipe changes) for one tuning trial; raises HparamError on an invalid value."""
    cls = registry.method_class(method)
    sampled = cls.search_space(_FixedTrial(trial, bench.fixed[method], bench.protocol.ranges.get(method)))
    hparams = cls.resolve({**sampled, **bench.fixed[method]})
    shared = {}
    if bench.protocol.tune_shared:
        lr = bench.base.lr
        shared["lr"] = trial.suggest_float(f"{SHARED_PREFIX}lr", lr / 10, lr * 10, log=True)
        shared["weight_decay"] = trial.suggest_float(f"{SHARED_PREFIX}weight_decay", 1e-6, 1e-2, log=True)
    return hparams, shared


def space_keys(bench: Benchmark, method: str) -> list[str]:
    """The params a tuning trial of ``method`` searches (the method's space minus --set names, plus shared ones)."""
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    suggest(bench, method, trial)
    return list(trial.distributions)


def check_search_spaces(bench: Benchmark, check: Callable[[str, dict], None] | None = None, draws: int = 16) -> None:
    """Sample each space a few times in memory before anything is written, so a space that yields an invalid hparam
    (with these --set values), or one the model rejects (``check``: a dry-run attach), fails in one line instead of
    mid-sweep."""
    if not bench.protocol.tunes:
        return
    for method in bench.methods:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(draws):
            trial = study.ask()
            try:
                hparams, _ = suggest(bench, method, trial)
                key = json.dumps(hparams, sort_keys=True, default=str)
                if check is not None and key not in seen:
                    seen.add(key)
                    check(method, hparams)
            except RegbenchError as exc:
                raise ConfigError(f"the search space of {method!r} yields an invalid hparam ({exc}); fix the "
                                  f"method's search_space or fix that hparam with --set") from None
            study.tell(trial, 0.0)



SPEC_LABEL = ("regbench benchmark record, not a study: it holds no trials by design, only the benchmark's spec and "
              "each method's selected configuration. The runs are in the studies NAME:METHOD:tune:… (tuning) and "
              "NAME:METHOD:final (one trial per seed of the selected configuration).")
FINAL_LABEL = ("regbench final runs: one trial per seed of the configuration selected on validation. 'Best Trial' "
               "here is the luckiest seed, not a better configuration. Every param is that configuration, fixed (a "
               "range of one value); the seed is the user attribute 'seed', not a param, so the importance bars are "
               "equal by construction. Compare methods in the leaderboard or the MLflow parent runs.")


def save_spec(storage, bench: Benchmark) -> None:
    """The benchmark's record: a study named after the benchmark holding the spec as a user attribute (the name every
    store since the first uses, so old stores stay readable), labelled ``about`` so Optuna's dashboard does not show
    it as an empty study to be read."""
    study = optuna.create_study(study_name=record.spec_study_name(bench.name), storage=storage, load_if_exists=True)
    # first, so a dashboard lists them above the long spec
    for key, value in ((record.ABOUT, SPEC_LABEL), (record.STUDY_BENCHMARK, bench.name),
                       (record.STUDY_RECIPE, dashboard.recipe_summary(bench))):
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    study.set_user_attr(record.SPEC, bench.spec())
    dashboard.save_note(study, f"## Benchmark {bench.name}\n\n{SPEC_LABEL}\n\n**Recipe**: "
                               f"{dashboard.recipe_summary(bench)}\n\n**Command**: `{bench.command}`")


def final_params(cfg: RunConfig) -> dict[str, tuple]:
    """A final run's Optuna params, name -> (value, distribution): the method and the selected configuration's
    hparams, each a range of one value, and never the seed (the user attribute ``seed``).

    The seed is not a param because optuna-dashboard's importance panel plots every param, and a seed shown there
    reads as an important hyperparameter (docs/architecture.md, "Final runs in optuna-dashboard"). Which runs are
    the same is decided by the config key, not by params."""
    params = {"method": (cfg.method, optuna.distributions.CategoricalDistribution((cfg.method,)))}
    for name, value in cfg.hparams.items():
        if isinstance(value, int) and not isinstance(value, bool):
            dist = optuna.distributions.IntDistribution(value, value)
        elif isinstance(value, float) and math.isfinite(value):
            dist = optuna.distributions.FloatDistribution(value, value)
        else:
            if not (value is None or isinstance(value, (bool, str))):  # a list, a dict, a non-finite float
                value = json.dumps(value, sort_keys=True)
            dist = optuna.distributions.CategoricalDistribution((value,))
        params[name] = (value, dist)
    return params


def record_final(trial, cfg: RunConfig) -> None:
    """Record a claimed final run's params (``final_params``) and its seed as a user attribute (queued by stores
    written before the attribute existed: their config has it), and label the final study."""
    for name, (value, dist) in final_params(cfg).items():
        if isinstance(dist, optuna.distributions.IntDistribution):
            trial.suggest_int(name, value, value)
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            trial.suggest_float(name, value, value)
        else:
            trial.suggest_categorical(name, [value])
    if trial.user_attrs.get(record.SEED) != cfg.seed:
        trial.set_user_attr(record.SEED, cfg.seed)
    if record.ABOUT not in trial.study.user_attrs:  # a Runner labels its studies in full (regbench/dashboard.py)
        trial.study.set_user_attr(record.ABOUT, FINAL_LABEL)



def budget_left(protocol: TuningRules, spent: tuple[int, int]) -> bool:
    n, epochs = spent
    if protocol.trials and n >= protocol.trials:
        return False
    return protocol.budget_epochs is None or epochs < protocol.budget_epochs



def study_names(bench: Benchmark) -> list[str]:
    names = [record.final_study_name(bench.name, m) for m in bench.methods]
    names += [bench.tune_study_name(m) for m in bench.methods if bench.tunes(m)]
    return names



# ---- a benchmark's identity: what its name binds ----------------------------------------------------------------

TUNING_FIELDS = ("pruner", "objective", "tune_shared", "oracle", "sampler_seed", "untuned", "startup_trials", "ranges")


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) == 64:  # a split hash
        return value[:10] + "…"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _recipe(spec: dict) -> dict:
    """The shared recipe and data split a spec binds: the keyed fields of its base run, less what varies per run."""
    base = RunConfig.from_json(spec["base"]) if isinstance(spec["base"], str) else RunConfig(**spec["base"])
    return {k: v for k, v in base.keyed().items() if k not in ("method", "hparams", "seed")}


def plan_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes, extensions) from a stored spec ``old`` to a new one: a change alters the protocol a benchmark's name
    binds (its recipe and data split, a method's fixed hparams or search space, the tuning rules, fewer seeds,
    methods, trials or epochs); an extension only adds to it (more seeds, methods, trials or tuning epochs). A spec
    stored before a field existed means that field's old value (TuningRules' defaults)."""
    changes, extensions = [], []
    a, b = _recipe(old), _recipe(new)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            changes.append(f"{k.replace('split_hash', 'data split')} {_shown(a.get(k))} → {_shown(b.get(k))}")
    olds, news = list(old["seeds"]), list(new["seeds"])
    if not set(olds) <= set(news):
        changes.append(f"seeds {_shown(olds)} → {_shown(news)}")
    elif set(news) - set(olds):
        extensions.append(f"seeds {_shown(sorted(set(news) - set(olds)))} added")
    om, nm = old["methods"], new["methods"]
    if set(om) - set(nm):
        changes.append(f"methods {', '.join(m for m in om if m not in nm)} dropped")
    if set(nm) - set(om):
        extensions.append(f"methods {', '.join(m for m in nm if m not in om)} added")
    p, q = asdict(TuningRules(**old.get("protocol", {}))), asdict(TuningRules(**new.get("protocol", {})))
    for m in [m for m in nm if m in om]:
        if om[m].get("fixed", {}) != nm[m].get("fixed", {}):
            changes.append(f"{m} --set {_shown(om[m].get('fixed')) if om[m].get('fixed') else 'none'} → "
                           f"{_shown(nm[m].get('fixed')) if nm[m].get('fixed') else 'none'}")
        elif ("space" in om[m] and p["trials"] + (p["budget_epochs"] or 0) and q["trials"] + (q["budget_epochs"] or 0)
              and p["tune_shared"] == q["tune_shared"] and om[m]["space"] != nm[m].get("space")):
            changes.append(f"{m} search space {_shown(om[m]['space'])} → {_shown(nm[m].get('space'))}")
    old_tunes, new_tunes = TuningRules(**p).tunes, TuningRules(**q).tunes
    for k in ("trials", "budget_epochs"):
        x, y = p[k], q[k]
        if x == y:
            continue
        if old_tunes and x and y and y > x:
            extensions.append(f"{k.replace('_', ' ')} {x} → {y}")
        else:
            changes.append(f"{k.replace('_', ' ')} {_shown(x or None) if k == 'budget_epochs' else x} → "
                           f"{_shown(y or None) if k == 'budget_epochs' else y}")
    if old_tunes and new_tunes:
        for k in TUNING_FIELDS:
            if p[k] != q[k] and not (k == "untuned" and tuple(p[k]) == tuple(q[k])):
                changes.append(f"{k.replace('_', ' ')} {_shown(p[k])} → {_shown(q[k])}")
    return changes, extensions
