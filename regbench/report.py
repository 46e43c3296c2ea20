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

from regbench.store import (
    final_study_name,
    final_trials,
    load_spec,
    selection,
    spent,
    trials_of,
)

REFERENCE = "baseline"


def runs_frame(storage, benchmark: str, spec: dict) -> pd.DataFrame:
    """One row per completed final run of the spec's configurations (a tidy frame for stats and reports)."""
    rows, seeds = [], set(spec["seeds"])
    for method, info in spec["methods"].items():
        group_key = selection(storage, benchmark, method, info).get("group_key")
        if group_key is None:  # still tuning: no finals yet
            continue
        for t in final_trials(storage, benchmark, method, group_key):
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
    proto = spec.get("protocol") or {}
    tuned = bool(proto.get("trials") or proto.get("budget_epochs"))
    if tuned:
        budget = " and ".join(x for x in (f"{proto['trials']} trials" if proto.get("trials") else "",
                                          f"{proto['budget_epochs']} epochs" if proto.get("budget_epochs") else "") if x)
        lines.append(f"- tuning: every method got {budget} of Optuna TPE (seed {proto.get('sampler_seed', 0)}, "
                     f"{proto.get('pruner', 'median')} pruner) over its search space"
                     + (" plus the shared lr and weight decay" if proto.get("tune_shared") else "")
                     + f", objective `{proto.get('objective', 'val_acc')}` on the validation split (test never read); "
                       "the best trial was rerun over the seeds below")
    else:
        lines.append("- no tuning: every method ran with its defaults (and any `--set`)")
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
                  f"|{shift_head} final erank | s/epoch | hparams; budget spent |",
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if shifted else "") + "---|---|---|"]
    budgets = {m: _budget(storage, benchmark, m, spec["methods"][m]) for m in methods}
    for method in methods:
        mine = df[df.method == method] if not df.empty else df
        chosen = selection(storage, benchmark, method, spec["methods"][method])
        info = spec["methods"][method]
        hparams = chosen.get("hparams", info["hparams"])
        shown = [k for k in hparams if k in set(info.get("space", [])) | set(info.get("fixed", {}))]
        hp = _hparams_text({**{k: hparams[k] for k in (shown if "space" in info else hparams)},
                            **chosen.get("shared", {})})
        if info.get("space") == [] and proto and tuned:
            hp = (hp if hp != "–" else "defaults") + " (nothing to tune)"
        hp += f"; {budgets[method]}"
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
                  + " Budget: training epochs and wall time spent by the method, tuning trials included. "
                  + "No significance test is applied in this table: read a Δ that is not clearly larger than its ± as "
                    "unresolved."]
    if proto.get("oracle"):
        lines += _oracle(storage, methods, spec)
    return "\n".join(lines) + "\n"


def _hparams_text(hparams: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in hparams.items()) or "–"


def _budget(storage, benchmark: str, method: str, info: dict) -> str:
    tuning = spent(trials_of(storage, info.get("tune_study")))
    finals = spent(trials_of(storage, final_study_name(benchmark, method)))
    epochs, seconds = tuning["epochs"] + finals["epochs"], tuning["seconds"] + finals["seconds"]
    text = f"{epochs} epochs, {seconds / 60:.1f} min"
    return text + (f" ({tuning['trials']} tuning trials)" if info.get("tune_study") else "")


def _oracle(storage, methods: list[str], spec: dict) -> list[str]:
    """ORACLE: each method's tuning trial with the best *test* accuracy. Selecting on test is optimistic and not a
    valid comparison; it bounds how much the validation-based selection above may have missed."""
    lines = ["", "## ORACLE (selected on test — optimistic, not a valid comparison)", "",
             "| method | ORACLE test acc % | tuning trial | hparams |", "|---|---|---|---|"]
    for method in methods:
        done = [t for t in trials_of(storage, spec["methods"][method].get("tune_study"))
                if t.state.name == "COMPLETE" and "test_acc" in t.user_attrs.get("metrics", {})]
        if not done:
            lines.append(f"| {method} | – | – | no tuning trial with a test score |")
            continue
        best = max(done, key=lambda t: t.user_attrs["metrics"]["test_acc"])
        import json
        cfg = json.loads(best.user_attrs["config"])
        lines.append(f"| {method} | {best.user_attrs['metrics']['test_acc'] * 100:.2f} | {best.number} | "
                     f"{_hparams_text(cfg['hparams'])} |")
    lines.append("")
    lines.append("ORACLE: one tuning run (seed 10000) per method, chosen by its test accuracy; never use it to rank "
                 "methods.")
    return lines


def write_leaderboard(storage, benchmark: str, out_dir: Path) -> Path:
    path = Path(out_dir) / "leaderboard.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(leaderboard(storage, benchmark))
    tmp.replace(path)
    return path
