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
        bench = {k: v for k, v in m.items() if k.startswith("shift/")}
        extra = {k: v for k, v in m.items() if k.startswith("shift_extra/")}
        assert len(bench) == 15 * 5 and len(extra) == 4 * 5
        assert {k.split("/")[1] for k in extra} == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
        assert m["shift_acc"] == pytest.approx(sum(bench.values()) / 75)
        assert m["shift_extra_acc"] == pytest.approx(sum(extra.values()) / 20)
        assert 0 <= m["shift_acc"] <= 1 and 0 <= m["shift_extra_acc"] <= 1
    # the generated set is cached in the data dir with its sidecar, in the official layout
    sidecars = list((data_dir / "digits_c_style").glob("*/regbench_sidecar.json"))
    assert len(sidecars) == 1 and (sidecars[0].parent / "labels.npy").is_file()


def test_relative_mce_is_the_mean_over_corruptions_of_summed_error_ratios():
    import pandas as pd

    from regbench.report import _relative_mce

    def row(method, seed, accs):
        return {"method": method, "seed": seed, "shift_blocks": accs}

    # baseline errors: fog 0.2+0.4, snow 0.5+0.5; method: fog 0.1+0.2 (ratio 0.5), snow 0.5+1.0 (ratio 1.5)
    base = {"shift/fog/1": 0.8, "shift/fog/5": 0.6, "shift/snow/1": 0.5, "shift/snow/5": 0.5}
    mine = {"shift/fog/1": 0.9, "shift/fog/5": 0.8, "shift/snow/1": 0.5, "shift/snow/5": 0.0}
    df = pd.DataFrame([row("baseline", 0, base), row("m", 0, mine)])
    assert _relative_mce(df, "m") == "1.000"
    mine_better_snow = dict(mine, **{"shift/snow/5": 0.75})  # snow errors 0.5+0.25 → ratio 0.75
    df = pd.DataFrame([row("baseline", 0, base), row("m", 0, mine_better_snow)])
    assert _relative_mce(df, "m") == f"{(0.5 + 0.75) / 2:.3f}"
    # seeds are averaged before the ratio
    df = pd.DataFrame([row("baseline", 0, base), row("baseline", 1, base),
                       row("m", 0, mine_better_snow), row("m", 1, mine_better_snow)])
    assert _relative_mce(df, "m") == "0.625"
