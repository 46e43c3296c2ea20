"""The tidy tables of a benchmark's final runs, read from the store: ``runs_frame`` (one row per run, for the
statistics, reports and figures) and the export (``regbench export``: OUT/results.csv or .parquet).

Kept apart from the leaderboard (regbench/report.py) so that ``regbench export`` imports pandas and the store only,
not the statistics (scipy, statsmodels) or the figures (matplotlib): its startup is measured by
benchmarks/startup.py. No torch, no training, no MLflow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from regbench import record
from regbench.errors import ConfigError, RegbenchError
from regbench.store import final_trials, load_spec, selection


def runs_frame(storage, benchmark: str, spec: dict) -> pd.DataFrame:
    """One row per completed final run of the spec's configurations (a tidy frame for stats and reports)."""
    rows, seeds = [], set(spec["seeds"])
    for method, info in spec["methods"].items():
        group_key = selection(storage, benchmark, method, info).get("group_key")
        if group_key is None:  # still tuning: no finals yet
            continue
        for t in final_trials(storage, benchmark, method, group_key):
            run = record.RunRecord.of(t)
            seed = run.seed
            if seed not in seeds:  # the store may hold other seeds of the same config
                continue
            m, layers, env = run.metrics, run.layers, run.env
            rows.append({
                "method": method, "seed": seed, "trial": t.number,
                "test_acc": m.get("test_acc", math.nan), "val_acc": m["val_acc"], "train_acc": m["train_acc"],
                "shift_acc": m.get("shift_acc", math.nan), "shift_extra_acc": m.get("shift_extra_acc", math.nan),
                "shift_blocks": {k: v for k, v in m.items() if k.startswith("shift/")},
                "gap": m["gap"], "ece": m.get("test_ece", math.nan), "nll": m.get("test_nll", math.nan),
                "erank": m.get(f"erank/{layers[-1]}", math.nan) if layers else math.nan,
                "erank_layer": layers[-1] if layers else "", "seconds_per_epoch": m["seconds_per_epoch"],
                "finished": run.finished, "torch": env.get("torch", "?"), "regbench": env.get("regbench", "?"),
                "git_commit": env.get("git_commit", ""), "device": env.get("device", "?"),
                "dataset": spec["dataset"], "model": spec["model"], "train_size": _train_size(t, spec),
                "config": run.config, "metrics": m, "layers": layers, "history": run.history,
            })
    return pd.DataFrame(rows)


def _train_size(trial, spec: dict):
    """Training samples of a run, when the command fixed them (--train-size or K per class); None = the full split."""
    cfg = record.config_dict(trial)
    if cfg.get("train_size"):
        return int(cfg["train_size"])
    if cfg.get("train_per_class") and spec.get("num_classes"):
        return int(cfg["train_per_class"]) * int(spec["num_classes"])
    return None


# Scalars stored with a run's metrics that come from its last epoch's history row: exported under names that say so,
# so they cannot be mistaken for the configuration (``lr`` is the configured peak rate, not the schedule's last
# value) or for a whole-run total (``seconds_per_epoch`` is the run's mean).
LAST_EPOCH_NAMES = {"lr": "last_epoch_lr", "seconds": "last_epoch_seconds", "epoch": "epochs_trained",
                    "train_loss": "last_epoch_train_loss", "reg_loss": "last_epoch_reg_loss"}
RECIPE = ("lr", "weight_decay", "epochs", "batch_size", "optimizer", "schedule")


def export_frame(storage, benchmark: str) -> pd.DataFrame:
    """One row per final run: dataset, model, train_size, method, seed, trial, the hparams as ``hp.<name>``, the
    recipe as configured (``lr`` is the configured peak learning rate), every scalar metric under its stored name
    (accuracies as fractions) except the last epoch's history values, which are renamed (``LAST_EPOCH_NAMES``).
    Integer-valued columns are integers (pandas ``Int64``, empty where a method lacks the hparam), booleans booleans.
    Non-scalar records (reliability bins) stay in the store. Columns are documented in README.md ("Export")."""
    spec = load_spec(storage, benchmark)
    if spec is None:
        raise RegbenchError(f"no benchmark named {benchmark!r} in this store; run `regbench run` first")
    df = runs_frame(storage, benchmark, spec)
    rows = []
    for run in df.itertuples():
        cfg = run.config
        row = {"benchmark": benchmark, "dataset": run.dataset, "model": run.model, "train_size": run.train_size,
               "method": run.method, "seed": run.seed, "trial": run.trial}
        row.update({f"hp.{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v)
                    for k, v in cfg.get("hparams", {}).items()})
        row.update({k: cfg.get(k) for k in RECIPE})
        row.update({LAST_EPOCH_NAMES.get(k, k): v for k, v in run.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    return _typed(rows)


def _typed(rows: list[dict]) -> pd.DataFrame:
    """The frame of ``rows`` where a column whose stored values are all integers (or all booleans), missing values
    aside, gets pandas' nullable Int64 (boolean) dtype: a method without ``hp.rank`` must not turn another's 32
    into 32.0. Types are read from the stored values, before pandas widens a column with gaps to float."""
    frame = pd.DataFrame(rows)
    for column in frame.columns:
        values = [r[column] for r in rows if r.get(column) is not None
                  and not (isinstance(r[column], float) and math.isnan(r[column]))]
        if not values:
            continue
        if all(isinstance(v, bool) for v in values):
            frame[column] = pd.array([r.get(column) for r in rows], dtype="boolean")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = pd.array([r.get(column) for r in rows], dtype="Int64")
    return frame


def write_export(storage, benchmark: str, out_dir: Path, fmt: str = "csv") -> Path:
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"--format {fmt!r} is not one of: csv, parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
    frame = export_frame(storage, benchmark)
    path = Path(out_dir) / f"results.{fmt}"
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False) if fmt == "csv" else frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
