"""Paper suites (issue 8): the reproduced quantities are asserted on real training runs, in their --smoke form."""
import numpy as np
import pytest
import torch

from regbench.cli import main
from regbench.suites import run_suite
from regbench.suites.ses_rings import TARGET, TOLERANCE, jacobian_condition, rings


def test_rings_are_three_separable_rings():
    x, y = rings(n_per_ring=200, seed=3)
    radius = np.hypot(x[:, 0], x[:, 1])
    assert sorted(np.unique(y)) == [0, 1, 2] and len(y) == 600
    for c, r in enumerate((1.0, 2.0, 3.0)):
        assert abs(radius[y == c].mean() - r) < 0.05
    assert radius[y == 0].max() < radius[y == 1].min() and radius[y == 1].max() < radius[y == 2].min()
    assert np.array_equal(x, rings(n_per_ring=200, seed=3)[0])  # seeded


def test_jacobian_condition_of_a_linear_map_is_its_singular_value_ratio():
    model = torch.nn.Linear(2, 3)
    u = torch.linalg.qr(torch.randn(3, 3))[0][:, :2]
    with torch.no_grad():
        model.weight.copy_(u @ torch.diag(torch.tensor([6.0, 1.5])))
    kappa = jacobian_condition(model, torch.randn(7, 2))
    assert kappa.shape == (7,) and np.allclose(kappa, 4.0, rtol=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
def test_jacobian_condition_is_infinite_where_the_jacobian_is_singular(rank):
    """Issue 17: a dead ReLU region has a singular Jacobian; its κ is ∞ (counted by the report), not 1/σ_min noise."""
    model = torch.nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0]]) * rank)
    kappa = jacobian_condition(model, torch.randn(5, 2))
    assert np.all(np.isinf(kappa)), kappa


def test_ses_rings_reproduces_p3_and_p4(tmp_path):
    res = run_suite("ses-rings", tmp_path, smoke=True)
    text = res["report"].read_text()
    # P3: every hidden layer of every SES run ends within ±5 % of 16^0.6 ≈ 5.28.
    assert res["erank_ses"].shape == (3, 5)
    assert np.all(np.abs(res["erank_ses"] / TARGET - 1) < TOLERANCE), res["erank_ses"]
    assert res["p3_reproduced"]
    # P4: κ(J) lower under SES than baseline, on the per-seed medians (the judged statistic).
    assert res["kappa_median_ses"].mean() < res["kappa_median_baseline"].mean()
    assert "singular test points (κ = ∞) per seed" in text and "criterion (fixed before the run)" in text
    assert text.index("criterion (fixed before the run)") < text.index("Per-seed median κ")  # stated before numbers
    assert res["acc_reproduced"]
    assert "57.3 ± 156.2" in text and "**P3**" in text and "**reproduced**" in text
    assert res["figure"].stat().st_size > 10_000 and res["figure"].read_bytes()[:4] == b"\x89PNG"


def test_dln_equilibrium_via_cli(tmp_path, capsys):
    assert main(["suite", "dln-equilibrium", "--smoke", "--out", str(tmp_path), "--quiet"]) == 0
    # --quiet, like `run --quiet`: no progress or warnings, only the result (the report's path)
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "dln-equilibrium.md") and err == ""
    text = (tmp_path / "dln-equilibrium.md").read_text()
    assert "not reproduced" not in text
    assert text.count("**reproduced**") == 4
    assert (tmp_path / "figures" / "dln-equilibrium.png").stat().st_size > 10_000


def test_dln_equilibrium_numbers(tmp_path):
    from regbench.suites import dln_equilibrium as dln

    rows = dln.theory_checks(n_starts=3, rng=np.random.default_rng(5))
    for r in rows:
        assert r["err"] < 1e-6  # equilibrium reached to 1e-6 from every start
        assert abs(r["fit_rel"] / r["rel"] - 1) < 1e-4 and abs(r["fit_unif"] / r["unif"] - 1) < 1e-4
        assert r["exact"] < 1e-8
    _t, hist, twin = dln.train_dln(4, 2, 1, 2, balanced=True, seed=0, lr=0.005, steps=1500)
    assert np.abs(hist[-1] - dln.sigma_star(4, 2, 1, 2)).max() < 1e-6
    assert np.abs(hist[-1] - twin.y[:, -1]).max() < 1e-6


@pytest.mark.parametrize("argv, message", [
    (["suite", "no-such-suite"], "unknown suite 'no-such-suite'"),
    (["suite", "ses-rings", "--seeds", "1"], "--seeds 1 is too few"),
])
def test_bad_suite_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    target = tmp_path / "report.md"
    target.write_text("keep me")
    assert main(["suite", "dln-equilibrium", "--smoke", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"
