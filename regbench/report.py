"""Leaderboard v1, generated from the store only (DESIGN.md §2): no torch, no training, no MLflow.

``leaderboard(storage, benchmark)`` reads the benchmark's spec and its final trials and returns markdown: one row per
method with mean ± std over seeds of test accuracy, generalization gap, final effective rank and seconds per epoch,
and the paired difference to ``baseline``.
"""
from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pandas as pd

from regbench.store import final_trials, load_spec

REFERENCE = "baseline"


def runs_frame(storage, benchmark: str, spec: dict) -> pd.DataFrame:
    """One row per completed final run of the spec's configurations (a tidy frame for stats and reports)."""
    rows, seeds = [], set(spec["seeds"])
    for method, info in spec["methods"].items():
        for t in final_trials(storage, benchmark, method, info["group_key"]):
            if int(t.params["seed"]) not in seeds:  # the store may hold other seeds of the same config
                continue
            m, layers = t.user_attrs["metrics"], t.user_attrs.get("diagnostic_layers", [])
            rows.append({
                "method": method, "seed": int(t.params["seed"]), "trial": t.number,
                "test_acc": m.get("test_acc", math.nan), "val_acc": m["val_acc"], "train_acc": m["train_acc"],
                "shift_acc": m.get("shift_acc", math.nan), "shift_extra_acc": m.get("shift_extra_acc", math.nan),
                "shift_blocks": {k: v for k, v in m.items() if k.startswith("shift/")},
                "gap": m["gap"], "ece": m.get("test_ece", math.nan), "nll": m.get("test_nll", math.nan),
                "erank": m.get(f"erank/{layers[-1]}", math.nan) if layers else math.nan,
                "erank_layer": layers[-1] if layers else "", "seconds_per_epoch": m["seconds_per_epoch"],
                "finished": t.datetime_complete, "torch": t.user_attrs.get("env", {}).get("torch", "?"),
                "regbench": t.user_attrs.get("env", {}).get("regbench", "?"),
                "git_commit": t.user_attrs.get("env", {}).get("git_commit", ""),
                "device": t.user_attrs.get("env", {}).get("device", "?"),
            })
    return pd.DataFrame(rows)


def _mean_std(values: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    v = values.dropna() * scale
    if v.empty:
        return "–"
    if len(v) < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _delta(df: pd.DataFrame, method: str) -> str:
    """Paired by seed: mean ± std of (method − baseline) test accuracy in percentage points."""
    if method == REFERENCE:
        return "—"
    ref = df[df.method == REFERENCE].set_index("seed")["test_acc"]
    mine = df[df.method == method].set_index("seed")["test_acc"]
    paired = (mine - ref).dropna()
    if paired.empty:
        return "n/a (no baseline run with the same seed)"
    sign = "+" if paired.mean() >= 0 else ""
    text = f"{sign}{paired.mean() * 100:.2f}"
    return text + (f" ± {paired.std(ddof=1) * 100:.2f}" if len(paired) > 1 else "")


def _relative_mce(df: pd.DataFrame, method: str) -> str:
    """mCE-style (Hendrycks & Dietterich 2019): per benchmark corruption, the method's error summed over severities
    over baseline's, averaged over corruptions; errors are seed means. 1.00 = as robust as baseline, lower = better."""
    def errors(rows):
        blocks = pd.DataFrame(list(rows.shift_blocks)).mean()
        return {k: 1 - v for k, v in blocks.items()}

    ref, mine = df[df.method == REFERENCE], df[df.method == method]
    if ref.empty or mine.empty or not len(mine.shift_blocks.iloc[0]):
        return "–"
    e_ref, e_mine = errors(ref), errors(mine)
    corruptions = sorted({k.split("/")[1] for k in e_mine})  # benchmark blocks only: extra ones are "shift_extra/"
    ratios = []
    for c in corruptions:
        keys = [k for k in e_mine if k.split("/")[1] == c and k in e_ref]
        denominator = sum(e_ref[k] for k in keys)
        if denominator > 0:
            ratios.append(sum(e_mine[k] for k in keys) / denominator)
    return f"{sum(ratios) / len(ratios):.3f}" if ratios else "–"


def leaderboard(storage, benchmark: str) -> str:
    spec = load_spec(storage, benchmark)
    if spec is None:
        from regbench.errors import RegbenchError
        raise RegbenchError(f"no benchmark named {benchmark!r} in this store; run `regbench run` first")
    df = runs_frame(storage, benchmark, spec)
    methods = list(spec["methods"])
    lines = [f"# Leaderboard: {benchmark}", "",
             f"- command: `{spec['command']}`",
             f"- dataset `{spec['dataset']}`, model `{spec['model']}`, {spec['epochs']} epochs, "
             f"seeds {', '.join(map(str, spec['seeds']))} (shared by every method, so differences are paired)"]
    if spec.get("shift"):
        lines.append(f"- shift set `{spec['shift']}`: generated CIFAR-C-style corruptions of the test split "
                     f"(\"-style\": not comparable with official CIFAR-C numbers)")
    if not df.empty:
        finished = max(df.finished)
        lines.append(f"- regbench {df.regbench.iloc[-1]}, torch {df.torch.iloc[-1]}, device {df.device.iloc[-1]}, "
                     f"git {df.git_commit.iloc[-1][:10] or 'n/a'}; last run finished "
                     f"{finished.replace(microsecond=0) if isinstance(finished, dt.datetime) else finished}")
        lines.append(f"- final effective rank (SES eq. 4) of `{df.erank_layer.iloc[-1]}` on 512 validation samples, "
                     f"last epoch")
    shifted = not df.empty and df.shift_acc.notna().any()
    shift_head = " corruption acc % | extra corr. acc % | rel. mCE |" if shifted else ""
    lines += ["", "| method | seeds | test acc % | Δ test vs baseline (pp, paired) | gap (pp) | ECE % | NLL "
                  f"|{shift_head} final erank | s/epoch | hparams |",
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if shifted else "") + "---|---|---|"]
    for method in methods:
        mine = df[df.method == method] if not df.empty else df
        hp = ", ".join(f"{k}={v}" for k, v in spec["methods"][method]["hparams"].items()) or "–"
        if mine.empty:
            lines.append(f"| {method} | 0 | no finished runs | | | | |{' | | |' if shifted else ''} | | {hp} |")
            continue
        lines.append(f"| {method} | {len(mine)} | {_mean_std(mine.test_acc, 100)} | {_delta(df, method)} | "
                     f"{_mean_std(mine.gap, 100)} | {_mean_std(mine.ece, 100)} | {_mean_std(mine.nll, 1, 3)} | "
                     + (f"{_mean_std(mine.shift_acc, 100)} | {_mean_std(mine.shift_extra_acc, 100)} | "
                        f"{_relative_mce(df, method)} | " if shifted else "") +
                     f"{_mean_std(mine.erank, 1, 1)} | "
                     f"{_mean_std(mine.seconds_per_epoch, 1, 3)} | {hp} |")
    lines += ["", "Mean ± sample standard deviation over seeds; test accuracy and gap at the last epoch "
                  "(gap = train − test accuracy); ECE (15 bins) and NLL on the clean test set."
                  + (" Corruption columns: mean accuracy over the 15 benchmark corruptions × 5 severities, over the 4 "
                     "extra ones separately, and the mCE-style error relative to baseline (1.00 = as robust; lower is "
                     "better)." if shifted else "")
                  + " No significance test is applied in this table: read a Δ that is not clearly larger than its ± as "
                    "unresolved."]
    return "\n".join(lines) + "\n"


def write_leaderboard(storage, benchmark: str, out_dir: Path) -> Path:
    path = Path(out_dir) / "leaderboard.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(leaderboard(storage, benchmark))
    tmp.replace(path)
    return path
