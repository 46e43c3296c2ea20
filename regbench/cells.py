"""The text of a report's cells: means with intervals, timings, p-values, marks, hparams. Shared by the leaderboard,
the summary and their LaTeX versions, so a number reads the same in every one of them."""
from __future__ import annotations

import math

import pandas as pd

from regbench import stats


def mean_cell(values: pd.Series, scale: float = 1.0, digits: int = 2, min_seeds: int = stats.MIN_SEEDS) -> str:
    """Mean ± half-width of its 95 % t-interval over seeds (the interval stats.compare gives). Below ``min_seeds``
    the mean alone, with the seed count in words: at 2 seeds the interval's t quantile is 12.7 and it means
    nothing (a 69 % accuracy ± 46 pp)."""
    v = values.dropna() * scale
    if v.empty:
        return "–"
    if len(v) < min_seeds:
        return f"{v.mean():.{digits}f}"  # the seeds column gives n; the legend says in words why no interval
    low, high = stats.t_ci(v.to_numpy(), 0.05)
    if low is None or not math.isfinite(low):  # every seed equal: no spread, the interval is the point
        return f"{v.mean():.{digits}f} ± 0"
    return f"{v.mean():.{digits}f} ± {(high - low) / 2:.{digits}f}"



def timing_cell(values: pd.Series, digits: int = 3) -> str:
    """Median and range of a timing over seeds: wall time is skewed by the machine's load and is not a quantity
    anyone wants a t-interval of (a mean ± interval at n = 2 even went negative)."""
    v = values.dropna()
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.median():.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f})"


def num(value, fmt: str = "{:.2f}") -> str:
    """None → "–", inf → "> 1000" (seeds needed beyond stats.MAX_SEEDS), else formatted."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return f"> {stats.MAX_SEEDS}"
    return fmt.format(value)


def p_text(p) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def mark(p, alpha: float = 0.05) -> str:
    if p is None:
        return "–"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < alpha else "ns"


def hparams_text(hparams: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in hparams.items()) or "–"


def delta_text(row) -> str:
    """A method's Δ to the reference in pp with its 95 % interval, as the table and the paired figure print it."""
    if row.verdict == "reference":
        return "—"
    if row.delta is None:
        return "–"
    text = f"{row.delta * 100:+.2f}"
    if row.delta_ci_low is not None:
        text += f" [{row.delta_ci_low * 100:+.2f}, {row.delta_ci_high * 100:+.2f}]"
    else:
        text += " (no interval, see notes)"
    return text
