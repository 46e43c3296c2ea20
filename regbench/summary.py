"""The cross-benchmark summary: methods ranked over benchmark cells (Demšar 2006 §3.2, :func:`regbench.stats.rank_across`).

A cell is one dataset × model × protocol, where the protocol is the whole stored spec of the benchmark (its
``record.SPEC``): the training recipe (epochs, lr, optimizer, schedule, batch size, weight decay, momentum, augment,
model options), the split (split seed, training samples or K per class, the split's hash), and the tuning (trials,
epoch budget, whether the shared recipe hparams were tuned, objective, pruner and whatever else the protocol
records). Benchmarks that differ in any of these are separate cells, never averaged into one, and the summary says
which fields kept them apart. Pure functions of specs and export frames: no store, no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import scipy.stats

from regbench import stats
from regbench.cells import num, p_text
from regbench.errors import ConfigError

# Fields of a run's configuration that are not part of a protocol: per run (method, hparams, seed), where and how it
# ran (device, data_dir, compile, eval_test), the cell's own coordinates (dataset, model), and evaluation-only
# choices that change no test accuracy (the shift set evaluated after training, a train-accuracy sample).
NOT_PROTOCOL = {"method", "hparams", "seed", "device", "data_dir", "compile", "eval_test", "dataset", "model", "shift",
                "train_acc_sample"}
# Protocol fields that change nothing a test accuracy depends on: the sampler's seed is the tuning's luck, not its
# plan, and the ORACLE section is a report-only extra.
NOT_PROTOCOL_TUNING = {"sampler_seed", "oracle"}
# The split's fields: the learning curve compares benchmarks that differ in these alone.
SPLIT_SIZE = ("train_size", "train_per_class", "split_hash")


@dataclass
class Entry:
    """One benchmark going into the summary: its name, its stored spec and its export frame (one row per run)."""

    name: str
    spec: dict
    frame: pd.DataFrame


def protocol(spec: dict) -> dict:
    """The protocol of a benchmark's stored spec as flat ``field -> value`` (tuning fields prefixed ``tuning.``)."""
    base = spec.get("base") or {}
    base = json.loads(base) if isinstance(base, str) else dict(base)
    out = {k: v for k, v in sorted(base.items()) if k not in NOT_PROTOCOL}
    out.setdefault("epochs", spec.get("epochs"))
    tuning = spec.get("protocol") or {}
    out.update({f"tuning.{k}": v for k, v in sorted(tuning.items()) if k not in NOT_PROTOCOL_TUNING})
    return out


def protocol_key(spec: dict, drop=()) -> str:
    """A string equal for two specs exactly when their protocols (less the ``drop`` fields) are equal."""
    return json.dumps({k: v for k, v in protocol(spec).items() if k not in drop}, sort_keys=True, default=str)


def differences(specs: list[dict], drop=()) -> list[str]:
    """The protocol fields whose values differ among ``specs``."""
    protos = [protocol(s) for s in specs]
    fields = sorted(set().union(*protos) - set(drop))
    return [f for f in fields if len({json.dumps(p.get(f), sort_keys=True, default=str) for p in protos}) > 1]


def _value(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:10]  # a hash: its first characters tell two apart
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def cells(entries: list[Entry]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The runs of every entry with a ``cell`` column (C1, C2, … in order of appearance), and per cell its dataset,
    model, protocol, spec and benchmarks."""
    keys: dict[tuple, str] = {}
    info: dict[str, dict] = {}
    frames = []
    for e in entries:
        key = (e.spec.get("dataset"), e.spec.get("model"), protocol_key(e.spec))
        if key not in keys:
            keys[key] = f"C{len(keys) + 1}"
            info[keys[key]] = {"dataset": key[0], "model": key[1], "protocol": protocol(e.spec), "spec": e.spec,
                               "benchmarks": []}
        info[keys[key]]["benchmarks"].append(e.name)
        if not e.frame.empty:
            frames.append(e.frame.assign(cell=keys[key]))
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["cell", "method"])
    return runs, info


def check(entries: list[Entry]) -> None:
    """Refuse a summary over benchmarks with nothing in common: a cell that shares fewer than two methods with every
    other cell can be ranked against none of them (the ranking would drop it with a note). One line naming them,
    before anything is written."""
    runs, info = cells(entries)
    if len(info) < 2:
        return
    methods = {c: set(runs.method[runs.cell == c]) for c in info}
    alone = [c for c in info if max(len(methods[c] & methods[o]) for o in info if o != c) < 2]
    if alone:
        names = "; ".join(f"{', '.join(info[c]['benchmarks'])} ({info[c]['dataset']}/{info[c]['model']}: "
                          f"{', '.join(sorted(methods[c])) or 'no runs'})" for c in alone)
        others = sorted(set().union(*methods.values()))
        raise ConfigError(f"the summary's benchmarks have nothing in common to rank: {names} share(s) fewer than "
                          f"two methods with every other benchmark; summarize benchmarks that ran the same methods, "
                          f"or run the missing ones under each benchmark's --name (`regbench run --methods "
                          f"{','.join(m for m in others if m != 'baseline')} ...`)")


def summary(entries: list[Entry], folder: Path, metric: str = "test_acc") -> tuple[str, list[Path], dict]:
    """The summary markdown, the figures written and the pieces the LaTeX version renders (``parts``)."""
    check(entries)
    runs, info = cells(entries)
    ranking = stats.rank_across(runs, metric, by=("cell",)) if not runs.empty else None
    lines = ["# Summary across benchmarks", "",
             f"{len(info)} benchmark cell(s). A cell is one dataset × model × protocol (recipe, split, training "
             f"samples, tuning budget, whether the shared hparams were tuned, objective): benchmarks that differ in "
             f"any of these are separate cells, never averaged together. Metric `{metric}` (seed mean per cell), "
             f"methods ranked 1 = best within each cell.", ""]
    differ = differences([c["spec"] for c in info.values()])
    cell_rows = []
    for name, c in info.items():
        size = c["protocol"].get("train_size") or (f"{c['protocol']['train_per_class']}/class"
                                                   if c["protocol"].get("train_per_class") else "full")
        shown = "; ".join(f"{f} {_value(c['protocol'].get(f))}" for f in differ) or "the same as every other cell"
        cell_rows.append([name, ", ".join(c["benchmarks"]), c["dataset"], c["model"], str(size), shown])
    lines += ["| cell | benchmarks | dataset | model | training samples | protocol fields that differ |",
              "|---|---|---|---|---|---|", *(("| " + " | ".join(r) + " |") for r in cell_rows), ""]
    kept = _kept_apart(info)
    common = {f: v for f, v in next(iter(info.values()))["protocol"].items() if f not in differ} if info else {}
    notes = []
    if common:
        notes.append("Common to every cell: " + ", ".join(f"{f} {_value(v)}" for f, v in common.items()) + ".")
    notes += kept
    if differ and len(info) > 1:
        notes.append(f"The cells' protocols differ in {', '.join(differ)}: each cell ranks its methods under its own "
                     f"protocol, and the mean ranks below average those ranks, not accuracies.")
    lines += [*notes, ""] if notes else []
    written: list[Path] = []
    rank_head, rank_rows, test_line, friedman_floor = [], [], "", ""
    if ranking is not None and ranking.n_cells:
        rank_head = ["method", "mean rank", *map(str, ranking.per_cell.index)]
        rank_rows = [[m, f"{r:.2f}", *(f"{v:g}" for v in ranking.per_cell[m])] for m, r in ranking.ranks.items()]
        lines += ["| " + " | ".join(rank_head) + " |", "|" + "---|" * len(rank_head),
                  *(("| " + " | ".join(r) + " |") for r in rank_rows)]
    lines.append("")
    if ranking is not None and ranking.friedman_p is not None:
        test_line = (f"Friedman χ² = {ranking.friedman_stat:.2f}, p = {p_text(ranking.friedman_p)}; Iman-Davenport "
                     f"F = {num(ranking.iman_davenport_f)}, p = {p_text(ranking.iman_davenport_p)}; Nemenyi critical "
                     f"difference CD = {ranking.cd:.2f} at α = {ranking.alpha:g} (q = {ranking.q_alpha:.3f}, "
                     f"k = {len(ranking.ranks)} methods, N = {ranking.n_cells} cells). Methods whose mean ranks "
                     f"differ by less than CD are not significantly different; groups: "
                     + ("; ".join("{" + ", ".join(g) + "}" for g in ranking.cliques()) or "none") + ".")
        lines.append(test_line)
        k, n = len(ranking.ranks), ranking.n_cells
        floor = float(scipy.stats.chi2.sf(n * (k - 1), k - 1))  # every cell ranking the methods the same way
        if floor >= ranking.alpha:
            friedman_floor = (f"**With N = {n} cells and k = {k} methods no ranking can be significant**: the largest "
                              f"possible Friedman χ² is N(k − 1) = {n * (k - 1)}, p = {floor:.3f} ≥ "
                              f"{ranking.alpha:g}. Read the ranks as a description of these cells, not as evidence; "
                              "the χ² approximation wants N > 10 and k > 5 (Demšar 2006 §3.2.2).")
            lines += ["", friedman_floor]
        path = stats.plot_critical_difference(ranking, None, Path(folder) / "figures" / "critical_difference.png",
                                              title=f"{metric}, {ranking.n_cells} cells")
        written.append(path)
        lines += ["", f"![critical-difference diagram](figures/{path.name})", "",
                  ("*Critical-difference diagram (Demšar 2006, Fig. 1): mean rank per method (1 = best, left); thick "
                  "bars join methods within CD of each other (not significantly different, Nemenyi).*")]
    if ranking is not None and ranking.note:
        lines += ["", f"Note: {ranking.note}."]
    parts = {"cells": (["cell", "benchmarks", "dataset", "model", "training samples", "protocol fields that differ"],
                       cell_rows),
             "ranks": (rank_head, rank_rows),
             "notes": [*notes, test_line, friedman_floor, f"Note: {ranking.note}." if ranking and ranking.note else ""],
             "metric": metric}
    return "\n".join(lines) + "\n", written, parts


def _kept_apart(info: dict[str, dict]) -> list[str]:
    """Per dataset × model with several cells: which protocol fields kept their benchmarks apart."""
    by_place: dict[tuple, list[str]] = {}
    for name, c in info.items():
        by_place.setdefault((c["dataset"], c["model"]), []).append(name)
    out = []
    for (dataset, model), names in by_place.items():
        if len(names) < 2:
            continue
        fields = differences([info[n]["spec"] for n in names])
        values = "; ".join(f"{f}: " + " vs ".join(f"{_value(info[n]['protocol'].get(f))} ({n})" for n in names)
                           for f in fields)
        out.append(f"Kept apart on {dataset}/{model}: cells {', '.join(names)} differ in {values}.")
    return out


def write_summary(entries: list[Entry], folder: Path, metric: str = "test_acc", latex: bool = False) -> list[Path]:
    """FOLDER/summary.md (and summary.tex with ``latex``) and the CD diagram; nothing is written when the
    benchmarks have nothing to rank in common."""
    check(entries)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, written, parts = summary(entries, folder, metric)
    path = folder / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    out = [path]
    if latex:
        from regbench import latex as _latex

        out.append(_latex.write(folder / "summary.tex", _latex.summary_tex(parts)))
    return [*out, *written]
