"""Calibration metrics on clean test data: ECE (15 bins), NLL, Brier, against hand computation and a plain loop.
The metric tests run on $REGBENCH_TEST_DEVICE (conftest.py's ``test_device``; default cpu): float64 throughout, so
the same tolerances hold on CUDA."""
import math

import numpy as np
import pytest
import torch

from regbench.metrics import calibration, expected_calibration_error


def loop_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The definition, literally: bins ((b−1)/M, b/M], weighted |accuracy − mean confidence|."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(1, bins + 1):
        lo, hi = (b - 1) / bins, b / bins
        inside = (conf > lo) & (conf <= hi) if b > 1 else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_hand_computed_two_samples(test_device):
    # Two samples, two classes: confidences 0.9 (right) and 0.6 (wrong) sit in different bins.
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64, device=test_device))
    y = torch.tensor([0, 1], device=test_device)
    assert expected_calibration_error(logits, y) == pytest.approx(0.5 * abs(1 - 0.9) + 0.5 * abs(0 - 0.6))
    m = calibration(logits, y)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4)) / 2)
    assert m["brier"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) + (0.6 ** 2 + 0.6 ** 2)) / 2)


def test_matches_the_plain_loop_on_random_predictions_with_saturated_ones(test_device):
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(5000, 10)) * 3, device=test_device)
    logits[:50, 0] = 1e4  # saturated softmax: confidence exactly 1.0 lands in the last bin
    y = torch.tensor(rng.integers(0, 10, 5000), device=test_device)
    probs = torch.softmax(logits, 1).cpu().numpy()
    assert expected_calibration_error(logits, y) == pytest.approx(loop_ece(probs, y.cpu().numpy()), abs=1e-12)
    assert calibration(logits, y)["ece"] == expected_calibration_error(logits, y)


def test_perfectly_calibrated_and_overconfident(test_device):
    # 100 samples with confidence 0.8 of which exactly 80 are right: ECE 0. All wrong: ECE = 0.8.
    logits = torch.log(torch.tensor([[0.8, 0.2]] * 100, dtype=torch.float64, device=test_device))
    right = torch.tensor([0] * 80 + [1] * 20, device=test_device)
    assert expected_calibration_error(logits, right) == pytest.approx(0.0, abs=1e-12)
    wrong = torch.ones(100, dtype=torch.long, device=test_device)
    assert expected_calibration_error(logits, wrong) == pytest.approx(0.8)


def test_engine_records_calibration_on_clean_test(tiny_run):
    import json
    import sqlite3

    out, _ = tiny_run
    with sqlite3.connect(out / "regbench.db") as db:
        metrics = [json.loads(v) for (v,) in db.execute(
            "select value_json from trial_user_attributes where key='metrics'")]
    assert metrics and all({"test_ece", "test_nll", "test_brier"} <= set(m) for m in metrics)
    assert all(0 <= m["test_ece"] <= 1 and m["test_nll"] > 0 and 0 <= m["test_brier"] <= 2 for m in metrics)


def test_leaderboard_shows_calibration_columns(tiny_run):
    out, _ = tiny_run
    lines = (out / "leaderboard.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert "ECE %" in header and "NLL" in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in lines if line.startswith("| ses |"))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|")), strict=True))
    ece_mean = float(cells["ECE %"].split("±")[0])
    assert 0 <= ece_mean <= 100 and float(cells["NLL"].split("±")[0]) > 0
