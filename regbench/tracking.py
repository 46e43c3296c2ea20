"""MLflow mirror of every run, for people (docs/architecture.md, "The store is the record"). Never read back to make a
report.

One experiment per benchmark, a parent run per method, a child run per trial/seed. The tracking URI is the
standard one: ``MLFLOW_TRACKING_URI`` when set (resolved at the CLI edge), else a SQLite store in the output dir.
A child run is tagged with the trial's config key, so mirroring the same trial twice logs it once.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from regbench import faults
from regbench.first_use import retry_first_use

_BAD_KEY = re.compile(r"[^0-9A-Za-z_\-. /:]")


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


UI_RUNS_VIEW = "#/experiments?workflowType=machine_learning"  # MLflow 3.17's "Model training" view (not GenAI)


def ui_command(uri: str) -> str:
    """How to see the runs: MLflow 3.17 opens in its GenAI view (traces) unless told the workflow is model
    training, either by the URL parameter or the "Model training" switch at the top left."""
    page = f"{uri.rstrip('/')}/" if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000/"
    plain = (f"mlflow ui --backend-store-uri {uri}, then open {page}{UI_RUNS_VIEW} (or pick \"Model training\" at "
             f"the top left)")
    local = _sqlite_path(uri)
    if local is not None and local.name == "mlflow.db":  # a run folder's own store: `regbench ui` opens its views
        return f"regbench ui {local.parent} (prints the links to the runs table and charts), or {plain}"
    return plain


def _key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


_RACE_SIGNS = ("online migration expected", "out-of-date database schema", "already exists", "unique constraint",
               "duplicate key", "database is locked", "alembic_version")


def _lost_first_use_race(exc: Exception) -> bool:
    """Whether opening an MLflow store failed only because another process was creating its schema (MLflow migrates a
    fresh SQLite/SQL store on first use; two at once collide: "Online migration expected to match one row ...") or
    the same experiment at the same moment. Seen as a false "MLflow ... is unreachable" from two workers."""
    text = str(exc).lower()
    return any(sign in text for sign in _RACE_SIGNS)


def _first_use_lock(uri: str):
    """A file lock beside a SQLite MLflow store while it is opened: MLflow migrates a fresh store on first use, and two
    processes migrating one SQLite file at once break it for good (measured: "table _alembic_tmp_tags already
    exists", "duplicate column name: step" in 3 of 3 two-worker launches). Server databases migrate in transactions;
    for them the retry above is enough."""
    import contextlib

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    return FileLock(str(path) + ".lock", timeout=300) if path.parent.is_dir() else contextlib.nullcontext()


ARTIFACT_DIR = "mlartifacts"  # beside OUT/mlflow.db: a run folder holds its MLflow artifacts
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# History names renamed in MLflow so no metric shares a name with a param or reads as something else: ``lr`` is the
# configured rate (a param); the schedule's per-epoch values are the metric ``scheduled_lr``.
SERIES_NAMES = {"lr": "scheduled_lr", "seconds": "epoch_seconds"}
PLAN_TAG, SUPERSEDED_TAG = "regbench.plan", "regbench.superseded"  # which plan of the benchmark a run mirrors
# What a child run logs per epoch: the training curves and diagnostics that change. Test-set numbers (and the gap,
# train minus test) are final-only, logged once: a per-epoch test curve invites picking an epoch on test data.
# A layer's width is a constant of the model (a param); a method diagnostic with one value over every epoch (SES's
# eigensolver backend, 0 = torch on a CPU) is a param too, so no chart is spent on a flat line.
SERIES = {"train_acc", "val_acc", "val_nll", "train_loss", "reg_loss", "lr", "seconds", "objective"}
SERIES_PREFIXES = ("erank/",)
FINAL_ONLY_PREFIXES = ("test_", "shift")
FINAL_ONLY = {"gap"}
CONSTANT_PREFIXES = ("width/",)
HEADLINE = "test_acc"  # logged first on every run, so MLflow's default picks (first metric) start from it
DATA_CONTEXT = "train/val/test"  # the dataset input's context tag: the split file holds all three splits


def metrics_of(history: list[dict], final: dict) -> tuple[list[tuple[str, float, int]], dict]:
    """A child run's metrics as (name, value, step), headline first, then the other final-only values once (at the
    last epoch), then the per-epoch series; and the constants, logged as params. ``history``: one dict per epoch;
    ``final``: the run's final metrics."""
    keys = list(dict.fromkeys(k for row in history for k, v in row.items() if k != "epoch" and _number(v)))
    last = int(history[-1]["epoch"]) if history else 0
    series, constants, once = [], {}, {}
    for k in keys:
        points = [(float(row[k]), int(row["epoch"])) for row in history if _number(row.get(k))]
        if k.startswith(FINAL_ONLY_PREFIXES) or k in FINAL_ONLY:
            once[k] = points[-1][0]
        elif k.startswith(CONSTANT_PREFIXES) or (k not in SERIES and not k.startswith(SERIES_PREFIXES)
                                                  and len({v for v, _ in points}) == 1):
            constants[k] = _plain_number(points[-1][0])
        else:
            series += [(SERIES_NAMES.get(k, k), v, step) for v, step in points]
    for k, v in final.items():  # the final values win over the last history row; no duplicate of a series
        if k not in ("epoch", "lr", "seconds") and _number(v) and k not in constants and \
                (k in once or k not in keys):
            once[k] = float(v)
    order = sorted(once, key=lambda k: k != HEADLINE)
    values = [(k, once[k], last) for k in order]
    if HEADLINE not in once:  # a tuning run never reads the test split: its headline is the validation curve
        series.sort(key=lambda point: point[0] != "val_acc")
    return values + series, constants


def _plain_number(v: float):
    return int(v) if float(v).is_integer() else v


def shown_config(config: dict, env: dict) -> dict:
    """The config as a child run's params: the device the run actually used (``device`` as requested, e.g. "auto",
    is kept as ``device_requested`` when it differs) and the data folder without this machine's absolute path."""
    shown = dict(config)
    used = env.get("device")
    if used and used != config.get("device"):
        shown["device"], shown["device_requested"] = used, config.get("device")
    if config.get("data_dir"):
        shown["data_dir"] = shown_dir(str(config["data_dir"]))
    return shown


def shown_dir(path: str) -> str:
    """A folder as a run shows it: ``$REGBENCH_DATA`` when it is that, else relative to the current folder or the
    home folder when inside one, else its name alone (an absolute path names one machine's layout)."""
    import os

    folder = Path(path).expanduser()
    if not folder.is_absolute():
        return path
    named = os.environ.get("REGBENCH_DATA")
    if named and Path(named).expanduser().resolve() == folder.resolve():
        return "$REGBENCH_DATA"
    for base, shown in ((Path.cwd(), "{}"), (Path.home(), "~/{}")):
        try:
            return shown.format(folder.resolve().relative_to(base.resolve()).as_posix() or ".")
        except ValueError:
            continue
    return folder.name


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).expanduser() if uri.startswith("sqlite:///") else None


class Tracker:
    """Thin mirror over ``MlflowClient`` (no global active-run state, so it composes with any caller)."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        # MLflow configures its loggers on import; quiet its schema-migration INFO lines afterwards.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        with _first_use_lock(uri):
            def open_once():
                self.uri, self.client = uri, MlflowClient(uri)
                found = self.client.get_experiment_by_name(experiment)
                return found.experiment_id if found else self._create_experiment(experiment)

            # Another process (a worker started at the same moment) may be creating this store's schema, or this
            # experiment: both are there a moment later, and a retry then only reads them.
            self.experiment_id = retry_first_use(open_once, _lost_first_use_race)
        self._mark_training()
        self._parents: dict[str, str] = {}
        self._ends: dict[str, int] = {}  # latest child end per method, so a parent spans its children
        self._created: set[str] = set()
        self._datasets: dict[tuple[str, str], object] = {}

    def _create_experiment(self, name: str) -> str:
        """The benchmark's experiment. With a local SQLite store its artifacts go beside the database (OUT/mlartifacts),
        not to MLflow's default ./mlruns in whatever directory the command ran from; a tracking server keeps its own
        artifact store. The Default experiment MLflow creates in a fresh local store is deleted when empty, so the
        UI lists the benchmark alone."""
        local = _sqlite_path(self.uri)
        location = (local.parent / ARTIFACT_DIR).resolve().as_uri() if local is not None else None
        experiment_id = self.client.create_experiment(name, artifact_location=location)
        if local is not None:
            try:
                default = self.client.get_experiment("0")
                if default.lifecycle_stage == "active" and not self.client.search_runs(["0"], max_results=1,
                                                                                       run_view_type=3):
                    self.client.delete_experiment("0")
            except Exception:  # noqa: BLE001 - a store without a Default experiment, or one we may not delete
                pass
        return experiment_id

    def _mark_training(self) -> None:
        """Mark the experiment a model-training one: the ``mlflow.experimentKind`` tag "custom_model_development"
        (the UI's "Machine learning" type). MLflow 3.x before the global GenAI/Model-training switch open such an
        experiment on its runs; 3.17 follows the switch (default GenAI) or the URL's ``workflowType``, which
        ``ui_command`` therefore prints (checked in a headless Chromium, reports/mlflow/)."""
        tags = self.client.get_experiment(self.experiment_id).tags
        if tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1)
        return runs[0] if runs else None

    def parent(self, method: str, hparams: dict | None = None, start_ms: int | None = None) -> str:
        if method not in self._parents:
            # Find-or-create under the store's lock: workers that start together each found no parent and created
            # one (two parents of one method, then "UNIQUE constraint failed: params.key"). SQLite stores only; a
            # server store's parents are not serialized (see _first_use_lock).
            with _first_use_lock(self.uri):
                run = self._find(f"tags.`regbench.parent` = '{method}'")
                if run is None:
                    run = self.client.create_run(self.experiment_id, run_name=method, start_time=start_ms,
                                                 tags={"regbench.parent": method, "regbench.method": method,
                                                       **self._plan_tag()})
                    self._created.add(method)
                    if hparams:
                        from mlflow.entities import Param
                        self.client.log_batch(run.info.run_id, params=[Param(_key(f"hparams.{k}"), str(v))
                                                                       for k, v in hparams.items()])
            self._parents[method] = run.info.run_id
        return self._parents[method]

    plan = 0  # the benchmark's plan this tracker mirrors (use_plan); runs of plan 0 carry no plan tag

    def _plan_tag(self) -> dict:
        return {PLAN_TAG: str(self.plan)} if self.plan else {}

    def use_plan(self, plan: int) -> int:
        """Mirror plan ``plan`` of the benchmark, and retire every run of another plan (one that a `regbench run
        --supersede` replaced): each is tagged ``regbench.superseded`` and deleted (MLflow keeps deleted runs;
        ``mlflow runs restore`` brings one back), so no parent, child or chart of the UI counts it and a run the new
        plan shares with the old is mirrored afresh under the new parent. Returns how many runs were retired."""
        self.plan, retired, token = plan, 0, None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            for run in page:
                theirs = run.data.tags.get(PLAN_TAG, "0")
                if theirs != str(plan):
                    try:
                        self.client.set_tag(run.info.run_id, SUPERSEDED_TAG, f"plan {theirs} superseded by plan "
                                                                             f"{plan}")
                        self.client.delete_run(run.info.run_id)
                        retired += 1
                    except Exception:  # noqa: BLE001 - retired meanwhile by another worker of the new plan
                        if self.client.get_run(run.info.run_id).info.lifecycle_stage != "deleted":
                            raise
            token = page.token
            if not token:
                break
        if retired:
            self._parents.clear()
        return retired

    def link_dataset(self, run_id: str, config: dict, run=None) -> None:
        """The run's data as an MLflow dataset input, so the runs table's Dataset column names it: the dataset's name
        with the first 12 hex digits of its split hash as the digest (the name of the split file, splits/NAME-HASH
        .json, relative to the run folder). With that file beside a local store, the input is its index table
        (split, index: MLflow shows its rows and schema); elsewhere the name, digest and source alone. ``run``: the
        run as searched, to skip one that already has it."""
        entity = self._dataset(config)
        if entity is None or (run is not None and any(
                (d.dataset.name, d.dataset.digest) == (entity.name, entity.digest)
                for d in getattr(run.inputs, "dataset_inputs", None) or [])):
            return
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", DATA_CONTEXT)])])

    def _dataset(self, config: dict):
        name, split = config.get("dataset"), str(config.get("split_hash") or "")
        if not name:
            return None
        if (name, split) not in self._datasets:
            import json
            import warnings

            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.data.sources import LocalArtifactDatasetSource

            digest = split[:12] or "unknown"
            relative = f"splits/{name}-{digest}.json"
            local = _sqlite_path(self.uri)
            source = LocalArtifactDatasetSource(relative)
            with warnings.catch_warnings():  # MLflow's schema hints about integer columns: not ours to act on
                warnings.simplefilter("ignore")
                try:
                    indices = json.loads((local.parent / relative).read_text())["indices"] if local else None
                except (OSError, ValueError, KeyError, TypeError):
                    indices = None
                if isinstance(indices, dict):
                    import mlflow.data
                    import pandas as pd

                    frame = pd.DataFrame([(s, int(i)) for s, rows in indices.items() for i in rows],
                                         columns=["split", "index"])
                    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
                else:
                    dataset = MetaDataset(source, name=name, digest=digest)
                self._datasets[(name, split)] = dataset._to_mlflow_entity()  # the schema is inferred here
        return self._datasets[(name, split)]

    def show(self, storage, benchmark: str) -> None:
        """The experiment's at-a-glance state from the store (regbench/glance.py): identity tags and verdict on
        every parent, the comparison figure, the saved view and the primary metric."""
        from regbench import glance

        with _first_use_lock(self.uri):  # workers finishing together: one of them logs a changed figure
            glance.apply(self, storage, benchmark)

    def has_run(self, uid: str) -> bool:
        return self._find(f"tags.`regbench.uid` = '{uid}'") is not None

    def mirror(self, study_name: str, trial) -> None:
        """Mirror one finished Optuna trial (tuning or final) as a child of its method's parent run; pruned and
        failed trials are mirrored too, tagged with their state and reason."""
        import time

        from regbench import record

        if not record.has_config(trial):
            return
        run = record.RunRecord.of(trial)
        history = run.history or [{"epoch": e, "objective": v} for e, v in sorted(trial.intermediate_values.items())]
        started = run.timings.get("started") or (trial.datetime_start.timestamp() if trial.datetime_start
                                                 else time.time())
        seconds = run.timings.get("seconds") or run.budget.get("seconds", 0.0)
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state.name, "FAILED")
        state = trial.state.name.lower()
        if record.interrupted(trial):  # stopped, resumed by a queued copy: not failed
            status, state = "KILLED", "interrupted"
        self.log_trial(study_name, trial.number, run.config, run.key, run.metrics, history, run.env,
                       started=started, seconds=seconds, status=status, kind=run.kind, state=state,
                       reason=run.reason or None)

    def summarize(self, method: str, selected: dict, curve: list[tuple[int, float]], direction: str) -> None:
        """The parent run holds the selected configuration and the tuning curve (value and best-so-far per trial)."""
        from mlflow.entities import Metric, Param

        if not selected and not curve:
            return
        run_id = self.parent(method)
        existing = self.client.get_run(run_id).data.params
        params = [Param(_key(f"selected.{k}"), str(v)) for k, v in selected.get("hparams", {}).items()]
        params += [Param(_key(f"selected.{k}"), str(v)) for k, v in selected.get("shared", {}).items()]
        params += [Param("selected.tune_trial", str(selected.get("tune_trial")))]
        params = [p for p in params if p.key not in existing]  # MLflow params are write-once
        now = int(__import__("time").time() * 1000)
        metrics, best = [], None
        for number, value in sorted(curve):
            better = best is None or (value > best if direction == "maximize" else value < best)
            best = value if better else best
            metrics += [Metric("tuning/value", float(value), now, number), Metric("tuning/best", float(best), now,
                                                                                   number)]
        if params:
            self.client.log_batch(run_id, params=params[:100])
        if metrics and "tuning/value" not in self.client.get_run(run_id).data.metrics:
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def log_trial(self, study_name: str, trial_number: int, config: dict, config_key: str, metrics: dict,
                  history: list[dict], env: dict, started: float, seconds: float, status: str = "FINISHED",
                  kind: str = "final", state: str = "complete", reason: str | None = None) -> None:
        """Mirror one finished run; ``started`` (epoch seconds) and ``seconds`` give the UI its real duration."""
        uid = f"{study_name}#{trial_number}"
        if self.has_run(uid):
            return
        from mlflow.entities import Metric, Param

        method = config["method"]
        start_ms, end_ms = int(started * 1000), int((started + seconds) * 1000)
        self._ends[method] = max(self._ends.get(method, 0), end_ms)
        parent = self.parent(method, config.get("hparams") if kind == "final" else None, start_ms)
        run_name = f"{method} seed {config['seed']}" if kind == "final" else f"{method} tuning {trial_number}"
        run = self.client.create_run(self.experiment_id, run_name=run_name, start_time=start_ms, tags={
            "mlflow.parentRunId": parent, "regbench.method": method, "regbench.config_key": config_key,
            "regbench.uid": uid, "regbench.kind": kind, "regbench.state": state,
            **({"regbench.fail_reason": reason[:500]} if reason else {}),
            "regbench.study": study_name, "regbench.trial": str(trial_number), "regbench.seed": str(config["seed"]),
            **self._plan_tag(), **{f"env.{k}": str(v) for k, v in env.items()}})
        params = [Param(_key(f"hparams.{k}"), str(v)) for k, v in config.get("hparams", {}).items()]
        params += [Param(_key(k), str(v)) for k, v in shown_config(config, env).items() if k != "hparams"]
        values, constants = metrics_of(history, metrics)
        params += [Param(_key(k), str(v)) for k, v in constants.items()]
        series = [Metric(_key(k), v, end_ms, step) for k, v, step in values]
        self.link_dataset(run.info.run_id, config)
        for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params and 1000 metrics
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        faults.point("mirror")  # test hook (regbench/faults.py): a crash with the run half-mirrored
        for i in range(0, len(series), 1000):
            self.client.log_batch(run.info.run_id, metrics=series[i:i + 1000])
        self.client.set_terminated(run.info.run_id, status=status, end_time=end_ms)

    def log_results(self, method: str, metrics: dict, params: dict) -> None:
        """The method's aggregated final results on its parent run (mean over seeds and, with enough seeds, the
        interval ends, as the leaderboard computes them), so the runs table and its charts compare methods directly;
        ``params``: the selected hparams and recipe. Metrics are logged at step 0: MLflow 3.17 draws a metric that
        has only step 0 as one bar per run (a bar chart across methods), and shows the latest value after a rerun
        with more seeds (``n_seeds`` says how many); params are write-once in MLflow, missing ones are added."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.parent(method)
        metrics = dict(metrics)
        seeds = metrics.pop("n_seeds", None)  # a count, not a result: a tag (column), no chart spent on it
        # The headline first: MLflow's default picks (the compare view's plots) start from the first metric.
        order = sorted(metrics, key=lambda k: (not k.startswith(HEADLINE), k != HEADLINE))
        with _first_use_lock(self.uri):  # params are write-once: read which exist and add the rest in one step
            run = self.client.get_run(run_id)
            existing, latest = run.data.params, run.data.metrics
            now = int(time.time() * 1000)
            values = [Metric(_key(k), float(metrics[k]), now, 0) for k in order if _number(metrics[k])]
            if all(latest.get(m.key) == m.value for m in values):  # a rerun that trains nothing changes nothing
                values = []
            tags = [] if seeds is None or run.data.tags.get("n_seeds") == str(int(seeds)) else \
                [RunTag("n_seeds", str(int(seeds)))]
            self.client.log_batch(run_id, metrics=values[:1000], tags=tags,
                                  params=[Param(_key(k), str(v)) for k, v in params.items()
                                          if _key(k) not in existing][:100])

    def log_artifact(self, method: str | None, path: Path, all_parents: bool = False, subdir: str | None = None) -> None:
        """Attach a file (the leaderboard) to a method's parent run, or to every parent when method is None
        (``all_parents``: every parent run of the experiment, also those another process created)."""
        if all_parents:
            runs = self.client.search_runs([self.experiment_id], filter_string="tags.`regbench.parent` != ''",
                                           max_results=1000)
            for run in runs:
                self._parents.setdefault(run.data.tags["regbench.parent"], run.info.run_id)
        targets = [self.parent(method)] if method else list(self._parents.values())
        for run_id in targets:
            self.client.log_artifact(run_id, str(path), subdir)

    def close(self) -> None:
        # Parents untouched by this session keep their times, so a rerun that trains nothing changes nothing.
        for method, run_id in self._parents.items():
            if method in self._ends:
                self.client.set_terminated(run_id, end_time=self._ends[method])
            elif method in self._created:
                self.client.set_terminated(run_id)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def unreachable(uri: str, timeout: float = 3.0) -> str | None:
    """Why an MLflow tracking server cannot be reached (None when it answers /health, or for a local store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"/health answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


class SafeTracker:
    """The mirror must never stop training (the store of record is Optuna's storage): the first MLflow error is
    reported once, then mirroring stops for this process; `regbench sync-mlflow OUT` mirrors what is missing later."""

    def __init__(self, uri: str, experiment: str, warn):
        import os

        # MLflow retries a dead server with backoff for minutes by default; a mirror should give up fast.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self._warn, self._tracker = uri, warn, None
        reason = unreachable(uri)
        if reason is None:
            try:
                self._tracker = Tracker(uri, experiment)
            except Exception as exc:  # noqa: BLE001 - any MLflow failure must only cost the mirror
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if reason is not None:
            self._disable(reason)

    def _disable(self, reason: str) -> None:
        self._tracker = None
        self._warn(f"regbench: warning: MLflow at {self.uri} is unreachable ({reason[:160]}); training goes on and "
                   f"the store keeps every run; mirror them later with `regbench sync-mlflow OUT`")

    @property
    def active(self) -> bool:
        return self._tracker is not None

    def __getattr__(self, name):
        method = getattr(self._tracker, name) if self._tracker is not None else None

        def call(*args, **kwargs):
            if self._tracker is None:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self._disable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                return None
        return call


def mirror_benchmark(storage, tracker, bench) -> None:
    """Mirror every trial of the benchmark that MLflow lacks (one run by another worker, or lost in a crash between
    store and mirror), and give each method's parent run its selection, tuning curve and aggregated results (the
    leaderboard's numbers). Reads the store through ``regbench.store`` only."""
    from regbench import record, report, store

    if bench.plan:  # a superseding plan: the runs of the plans it replaced leave every parent (retire_other_plans)
        tracker.use_plan(bench.plan)
    summaries = []
    for method in bench.methods:
        # The current plan's runs only: its tuning study and its selected configuration's finals over its seeds.
        final = record.final_study_name(bench.name, method)
        studies = [(final, store.plan_finals(storage, bench.name, method, {"ident": bench.ident(method)},
                                             bench.seeds))]
        if bench.tunes(method):
            studies.append((bench.tune_study_name(method), store.trials_of(storage, bench.tune_study_name(method))))
        for name, trials in studies:
            for t in trials:
                if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and not record.skipped(t):
                    tracker.mirror(name, t)
        selected = store.selection(storage, bench.name, method, {"ident": bench.ident(method)})
        curve = store.completed_values(storage, bench.tune_study_name(method)) if bench.tunes(method) else []
        summaries.append((method, selected, curve))
    # The results before the tuning curves, so a parent's first metric is the headline (see log_results).
    for method, results in report.parent_results(storage, bench.name).items():
        tracker.log_results(method, **results)
    for method, selected, curve in summaries:
        tracker.summarize(method, selected, curve, bench.protocol.direction)
    tracker.show(storage, bench.name)


def attach_report(uri: str, benchmark: str, paths, warn) -> None:
    """The leaderboard and its figures, as artifacts of every method's parent run (figures under ``figures/``). A
    broken or unreachable MLflow costs the attachment only (one warning through ``warn``), never the report."""
    tracker = SafeTracker(uri, benchmark, warn)
    for artifact in paths:
        tracker.log_artifact(None, artifact, all_parents=True, subdir="figures" if artifact.suffix == ".png" else None)
    tracker.close()
