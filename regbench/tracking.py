"""MLflow mirror of every run, for people (DESIGN.md §4). Never read back to make a report.

One experiment per benchmark, a parent run per method, a child run per trial/seed. The tracking URI is the
standard one: ``MLFLOW_TRACKING_URI`` when set (resolved at the CLI edge), else a SQLite store in the output dir.
A child run is tagged with the trial's config key, so mirroring the same trial twice logs it once.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from regbench import faults

_BAD_KEY = re.compile(r"[^0-9A-Za-z_\-. /:]")


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def _key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


class Tracker:
    """Thin mirror over ``MlflowClient`` (no global active-run state, so it composes with any caller)."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        # MLflow configures its loggers on import; quiet its schema-migration INFO lines afterwards.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri, self.client = uri, MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self._parents: dict[str, str] = {}
        self._ends: dict[str, int] = {}  # latest child end per method, so a parent spans its children
        self._created: set[str] = set()

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1)
        return runs[0] if runs else None

    def parent(self, method: str, hparams: dict | None = None, start_ms: int | None = None) -> str:
        if method not in self._parents:
            run = self._find(f"tags.`regbench.parent` = '{method}'")
            if run is None:
                run = self.client.create_run(self.experiment_id, run_name=method, start_time=start_ms,
                                             tags={"regbench.parent": method, "regbench.method": method})
                self._created.add(method)
                if hparams:
                    from mlflow.entities import Param
                    self.client.log_batch(run.info.run_id,
                                          params=[Param(_key(f"hparams.{k}"), str(v)) for k, v in hparams.items()])
            self._parents[method] = run.info.run_id
        return self._parents[method]

    def has_run(self, uid: str) -> bool:
        return self._find(f"tags.`regbench.uid` = '{uid}'") is not None

    def mirror(self, study_name: str, trial) -> None:
        """Mirror one finished Optuna trial (tuning or final) as a child of its method's parent run; pruned and
        failed trials are mirrored too, tagged with their state and reason."""
        import json
        import time

        from regbench.store import INTERRUPTED

        attrs = trial.user_attrs
        if "config" not in attrs:
            return
        config = json.loads(attrs["config"])
        history = attrs.get("history") or [{"epoch": e, "objective": v} for e, v in
                                           sorted(trial.intermediate_values.items())]
        started = attrs.get("timings", {}).get("started") or (trial.datetime_start.timestamp()
                                                               if trial.datetime_start else time.time())
        seconds = attrs.get("timings", {}).get("seconds") or attrs.get("budget", {}).get("seconds", 0.0)
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state.name, "FAILED")
        state = trial.state.name.lower()
        if str(attrs.get("fail_reason", "")).startswith(INTERRUPTED):  # stopped, resumed by a queued copy: not failed
            status, state = "KILLED", "interrupted"
        self.log_trial(study_name, trial.number, config, attrs["config_key"], attrs.get("metrics", {}), history,
                       attrs.get("env", {}), started=started, seconds=seconds, status=status,
                       kind=attrs.get("kind", "final"), state=state,
                       reason=attrs.get("fail_reason"))

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
            **{f"env.{k}": str(v) for k, v in env.items()}})
        params = [Param(_key(f"hparams.{k}"), str(v)) for k, v in config.get("hparams", {}).items()]
        params += [Param(_key(k), str(v)) for k, v in config.items() if k != "hparams"]
        series = [Metric(_key(k), float(v), end_ms, int(row["epoch"])) for row in history for k, v in row.items()
                  if k != "epoch" and isinstance(v, (int, float)) and v == v]
        series += [Metric(_key(f"final/{k}"), float(v), end_ms, 0) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params and 1000 metrics
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        faults.point("mirror")  # test hook (regbench/faults.py): a crash with the run half-mirrored
        for i in range(0, len(series), 1000):
            self.client.log_batch(run.info.run_id, metrics=series[i:i + 1000])
        self.client.set_terminated(run.info.run_id, status=status, end_time=end_ms)

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
