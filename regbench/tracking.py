"""MLflow mirror of every run, for people (DESIGN.md §4). Never read back to make a report.

One experiment per benchmark, a parent run per method, a child run per trial/seed. The tracking URI is the
standard one: ``MLFLOW_TRACKING_URI`` when set (resolved at the CLI edge), else a SQLite store in the output dir.
A child run is tagged with the trial's config key, so mirroring the same trial twice logs it once.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

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

    def has_run(self, config_key: str) -> bool:
        return self._find(f"tags.`regbench.config_key` = '{config_key}'") is not None

    def log_trial(self, study_name: str, trial_number: int, config: dict, config_key: str, metrics: dict,
                  history: list[dict], env: dict, started: float, seconds: float, status: str = "FINISHED") -> None:
        """Mirror one finished run; ``started`` (epoch seconds) and ``seconds`` give the UI its real duration."""
        if self.has_run(config_key):
            return
        from mlflow.entities import Metric, Param

        method = config["method"]
        start_ms, end_ms = int(started * 1000), int((started + seconds) * 1000)
        self._ends[method] = max(self._ends.get(method, 0), end_ms)
        parent = self.parent(method, config.get("hparams"), start_ms)
        run = self.client.create_run(self.experiment_id, run_name=f"{method} seed {config['seed']}",
                                     start_time=start_ms, tags={
            "mlflow.parentRunId": parent, "regbench.method": method, "regbench.config_key": config_key,
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
        for i in range(0, len(series), 1000):
            self.client.log_batch(run.info.run_id, metrics=series[i:i + 1000])
        self.client.set_terminated(run.info.run_id, status=status, end_time=end_ms)

    def log_artifact(self, method: str | None, path: Path) -> None:
        """Attach a file (the leaderboard) to a method's parent run, or to every parent when method is None."""
        targets = [self.parent(method)] if method else list(self._parents.values())
        for run_id in targets:
            self.client.log_artifact(run_id, str(path))

    def close(self) -> None:
        # Parents untouched by this session keep their times, so a rerun that trains nothing changes nothing.
        for method, run_id in self._parents.items():
            if method in self._ends:
                self.client.set_terminated(run_id, end_time=self._ends[method])
            elif method in self._created:
                self.client.set_terminated(run_id)
