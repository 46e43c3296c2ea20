"""`regbench run --shift digits_c_style`: every final run is evaluated on the CIFAR-C-style corruptions of the test
split, the trial stores the corruption × severity table, and the leaderboard gains robustness and calibration columns."""
import json
import sqlite3

import pytest

from helpers import regbench_cli


@pytest.mark.slow
def test_shift_set_columns_end_to_end(tmp_path, data_dir):
    out = tmp_path / "out"
    proc = regbench_cli("run", "--methods", "ses", "--dataset", "digits", "--shift", "digits_c_style",
                        "--train-size", "300", "--epochs", "4", "--seeds", "1", "--quiet", "--out", str(out),
                        "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    board = (out / "leaderboard.md").read_text()
    header = next(line for line in board.splitlines() if line.startswith("| method |"))
    for column in ("test acc %", "ECE %", "NLL", "corruption acc %", "extra corr. acc %", "rel. mCE"):
        assert column in header
    assert "digits_c_style" in board and "-style" in board
    baseline_row = next(line for line in board.splitlines() if line.startswith("| baseline |"))
    assert "| 1.000 |" in baseline_row  # baseline's error relative to itself
    with sqlite3.connect(out / "regbench.db") as db:
        metrics = [json.loads(v) for (v,) in db.execute(
            "select value_json from trial_user_attributes where key='metrics'")]
    for m in metrics:
        blocks = {k: v for k, v in m.items() if k.startswith("shift/")}
        assert len(blocks) == 19 * 5
        bench = [v for k, v in blocks.items() if k.split("/")[1] not in
                 ("speckle_noise", "gaussian_blur", "spatter", "saturate")]
        assert m["shift_acc"] == pytest.approx(sum(bench) / 75)
        assert 0 <= m["shift_acc"] <= 1 and 0 <= m["shift_extra_acc"] <= 1
    # the generated set is cached in the data dir with its sidecar, in the official layout
    sidecars = list((data_dir / "digits_c_style").glob("*/regbench_sidecar.json"))
    assert len(sidecars) == 1 and (sidecars[0].parent / "labels.npy").is_file()
