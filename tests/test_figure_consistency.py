"""Figures a paper can reuse: redrawn from the same frame they are the same bytes (seaborn's jitter draws from numpy's
global generator, so it is seeded for the plot and restored after), and a method has one colour in every figure
(the paired-differences rows take the per-seed figure's colours, the reference's included in the assignment)."""
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from regbench import figures

METHODS = ["baseline", "ses", "shade", "dropout"]


def frames():
    rng = np.random.default_rng(1)
    runs = pd.DataFrame([{"method": m, "seed": s, "value": 0.8 + 0.01 * i + rng.normal(0, 0.01)}
                         for i, m in enumerate(METHODS) for s in range(4)])
    summary = pd.DataFrame([{"method": m, "mean": runs[runs.method == m].value.mean(), "ci_low": 0.79,
                             "ci_high": 0.83} for m in METHODS])
    pairs = pd.DataFrame([{"method": m, "seed": s, "delta": 0.01 * i, "degenerate": False}
                          for i, m in enumerate(METHODS[1:], 1) for s in range(4)])
    rows = pd.DataFrame([{"method": m, "delta": 0.01 * i, "delta_ci_low": 0.0, "delta_ci_high": 0.02 * i,
                          "label": m} for i, m in enumerate(METHODS[1:], 1)])
    return runs, summary, pairs, rows


def test_the_per_seed_figure_is_the_same_bytes_when_redrawn_and_leaves_numpy_alone(tmp_path):
    runs, summary, _, _ = frames()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = figures.seed_points(runs, summary, tmp_path / "a.png").read_bytes()
    assert (np.random.get_state()[1] == before).all()  # the caller's global generator is restored
    np.random.seed(999)  # another global state: the figure does not depend on it
    assert figures.seed_points(runs, summary, tmp_path / "b.png").read_bytes() == first


def test_a_method_has_one_colour_in_the_per_seed_and_the_paired_figures():
    runs, summary, pairs, rows = frames()
    strip = figures.seed_points_figure(runs, summary)
    paired = figures.paired_differences_figure(pairs, rows, 0.5)
    strip_colours = {to_hex(c.get_facecolor()[0]) for c in strip.axes[0].collections
                     if len(c.get_offsets()) and len(c.get_facecolor())}
    palette = {m: to_hex(c) for m, c in figures.method_palette(METHODS).items()}
    paired_colours = {to_hex(c.get_facecolor()[0]) for c in paired.axes[0].collections
                      if len(c.get_offsets()) == 4 and len(c.get_facecolor())}  # the per-seed dots of each row
    assert paired_colours == {palette[m] for m in METHODS[1:]}
    assert paired_colours <= strip_colours
