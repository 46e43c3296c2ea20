"""SES (seed 000, eq. 1-6): spectral_entropy against closed forms and numpy, gradients, the regularizer value."""
import math

import numpy as np
import pytest
import torch

from regbench.errors import HparamError
from regbench.methods.base import StepContext
from helpers import attached
from regbench.methods.ses import SES, as_matrix, spectral_entropy


def numpy_entropy(h: np.ndarray) -> float:
    """Eq. 1-3 literally: covariance, eigenvalues, normalised spectrum, Shannon entropy."""
    x = h - h.mean(axis=0, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(x.T @ x / (len(h) - 1)), 0, None)
    p = lam / lam.sum()
    p = p[p > 1e-12]
    return float(-(p * np.log(p)).sum())


def isotropic(d: int, scale: float = 3.0) -> torch.Tensor:
    # Rows ±scale·e_i: zero mean and covariance exactly proportional to the identity.
    eye = torch.eye(d, dtype=torch.float64) * scale
    return torch.cat([eye, -eye])


@pytest.mark.parametrize("d", [2, 7, 64])
def test_isotropic_data_has_entropy_log_d(d):
    assert spectral_entropy(isotropic(d)).item() == pytest.approx(math.log(d), abs=1e-10)


def test_rank_one_data_has_entropy_zero():
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    assert spectral_entropy(u @ v).item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("n,d", [(64, 16), (16, 64), (33, 33)])
def test_matches_numpy_on_both_gram_paths(n, d):
    h = torch.relu(torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64))
    assert spectral_entropy(h).item() == pytest.approx(numpy_entropy(h.numpy()), abs=1e-9)


def test_float32_is_close_to_float64():
    h = torch.randn(128, 48, dtype=torch.float64)
    assert spectral_entropy(h.float()).item() == pytest.approx(spectral_entropy(h).item(), abs=1e-5)


@pytest.mark.parametrize("h", [isotropic(8), torch.cat([isotropic(4), torch.zeros(8, 12, dtype=torch.float64)], 1),
                               torch.randn(6, 40, dtype=torch.float64)], ids=["repeated", "exact-zeros", "d>n"])
def test_gradient_is_finite_with_repeated_or_zero_eigenvalues(h):
    h = h.clone().requires_grad_(True)
    spectral_entropy(h).backward()
    assert torch.isfinite(h.grad).all()


def test_gradient_matches_finite_differences():
    h = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spectral_entropy, (h,), eps=1e-6, atol=1e-5)


def test_entropy_is_scale_invariant_and_rejects_non_matrices():
    h = torch.randn(30, 10, dtype=torch.float64)
    assert spectral_entropy(7.5 * h).item() == pytest.approx(spectral_entropy(h).item(), abs=1e-10)
    with pytest.raises(ValueError):
        spectral_entropy(torch.randn(2, 3, 4))


def test_conv_maps_reduce_to_channels():
    a = torch.randn(4, 6, 5, 5)
    assert as_matrix(a, "gap").shape == (4, 6)
    assert torch.allclose(as_matrix(a, "gap"), a.mean(dim=(2, 3)))
    assert as_matrix(a, "positions").shape == (4 * 25, 6)
    assert as_matrix(torch.randn(4, 6, 1, 1)).shape == (4, 6)


def test_regularizer_value_is_eq5_times_lambda():
    """R = Σ_l (H_l − β log d_l)², loss = λ R (eq. 5-6), on the two hidden layers of a real MLP, attached for real,
    fed activations whose entropies are known (log 4 and log 9)."""
    method = SES({"lam": 0.5, "beta": 0.5})
    keys = attached(method, "mlp")
    assert keys == ["act1", "act2"]
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1": isotropic(4), "act2": isotropic(9)})
    expected = 0.5 * ((math.log(4) - 0.5 * math.log(4)) ** 2 + (math.log(9) - 0.5 * math.log(9)) ** 2)
    assert method.loss(step).item() == pytest.approx(expected, abs=1e-10)
    method.after_step(step)
    assert method.diagnostics()["ses_entropy/act2"] == pytest.approx(math.log(9), abs=1e-10)


def test_pooled_layer_rule_hooks_only_the_last_feature_layer():
    assert attached(SES({"layers": "pool"}), "cnn1d") == ["act_fc"]


def test_unreachable_target_warns_once():
    method = SES({"beta": 0.9})
    attached(method, "mlp")
    few = {"act1": torch.randn(8, 256, dtype=torch.float64), "act2": torch.randn(8, 256, dtype=torch.float64)}
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None, activations=few)
    with pytest.warns(UserWarning, match="cannot reach zero"):
        method.loss(step)


def test_constant_layer_is_skipped_not_nan():
    method = SES()
    attached(method, "mlp")
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1": torch.zeros(16, 8), "act2": torch.zeros(16, 8)})
    assert method.loss(step) is None


@pytest.mark.parametrize("bad", [{"beta": 0}, {"beta": 1}, {"beta": 1.5}, {"lam": -0.1}, {"conv_reduce": "flat"},
                                 {"gamma": 1}])
def test_invalid_hparams_are_rejected(bad):
    with pytest.raises(HparamError):
        SES(bad)


def test_string_overrides_are_typed_like_defaults():
    assert SES({"beta": "0.6", "lam": "1e-3"}).hparams["beta"] == 0.6
    with pytest.raises(HparamError):
        SES({"beta": "high"})
