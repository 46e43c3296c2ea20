"""VICReg's variance and covariance terms as a supervised regularizer (Bardes, Ponce, LeCun, "VICReg:
Variance-Invariance-Covariance Regularization for Self-Supervised Learning", ICLR 2022, arXiv:2105.04906, Sec. 3).

For a batch of features Z ∈ R^{n×d} (n samples, d features z_j):

    S(z_j, ε) = sqrt(Var(z_j) + ε)                   Var unbiased (n − 1), ε = 1e-4
    v(Z)      = (1/d) Σ_j max(0, γ − S(z_j, ε))        the variance hinge, γ = 1
    C(Z)      = Z_cᵀ Z_c / (n − 1)                     Z_c = Z minus its batch mean
    c(Z)      = (1/d) Σ_{i≠j} C(Z)_ij²                 the covariance term
    L         = L_task + var_weight·v(Z) + cov_weight·c(Z)

The definitions follow the official loss (facebookresearch/vicreg ``main_vicreg.py``: ``x.var(dim=0)``, ε = 1e-4,
off-diagonal squares summed and divided by the number of features), as docs/methods.md §4.6 records.

Our adaptation [C] (not a published recipe): one view only, so the invariance term (which needs two augmented views)
is dropped and each term is taken once rather than averaged/summed over two branches; no expander/projector, the
terms act directly on the captured features, by default ``layers="pool"`` (the penultimate representation; ResNet:
the pooled 512-d features). Conv maps are global-average-pooled to [B, C]; several layers add up. Float32 (float64
kept), autocast off. The self-supervised coefficients (25 / 25 / 1) balance an invariance MSE, not a cross-entropy,
so they do not carry over. Defaults var_weight = 0.1, cov_weight = 1; search var_weight log-uniform in [1e-3, 1]
(docs/methods.md §4.6) and cov_weight in [1e-3, 10] (widened from [1e-3, 1]). Measured on mnist1d/cnn1d (30-epoch
recipe, 2 seeds, test accuracy; no regularizer 0.885/0.896): var 0.1 with cov 1e-3 0.912/0.921, 1e-2 0.928/0.928,
0.1 0.946/0.945, 1 0.958/0.959, 3 0.967/0.971, 10 0.963/0.981; cov 0.1 with var 1e-3 0.940/0.951,
1e-2 0.953/0.954, 1 0.905/0.899.
With post-ReLU features the variance hinge (γ = 1) pushes each feature's batch std up towards 1, which in principle
counters the shrink-to-decorrelate escape a covariance penalty alone allows (DeCov's pitfall); in the runs above the
covariance term won (v stayed 0.5-0.8 at var_weight 0.1, i.e. stds well under γ). ``diagnostics()`` logs v and c.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, StepContext, check_range
from .decov import feature_matrix, off_diagonal, off_diagonal_sq_sum  # noqa: F401 (off_diagonal: public)

EPS = 1e-4  # inside the square root, as in the official loss


def variance_term(z: Tensor, gamma: float = 1.0, eps: float = EPS) -> Tensor:
    """v(Z) = mean_j ReLU(γ − sqrt(Var(z_j) + ε)), Var with n − 1."""
    return torch.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: Tensor) -> Tensor:
    """c(Z) = (1/d) Σ_{i≠j} C_ij², C = Z_cᵀZ_c/(n − 1)."""
    return both_terms(z)[1]


def both_terms(z: Tensor, gamma: float = 1.0, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(v(Z), c(Z)) from one centring and one covariance: Var(z_j) is C's diagonal."""
    n, d = z.shape
    centred = z - z.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (n - 1)
    v = torch.relu(gamma - torch.sqrt(cov.diagonal() + eps)).mean()
    return v, off_diagonal_sq_sum(cov) / d


class VICRegReg(Method):
    name = "vicreg_reg"
    description = "VICReg variance + covariance terms on the penultimate features (no invariance term)"
    paper = "Bardes, Ponce, LeCun ICLR 2022, arXiv:2105.04906, Sec. 3 (adapted: one view, supervised)"
    defaults = {"var_weight": 0.1, "cov_weight": 1.0, "gamma": 1.0, "layers": "pool"}

    @classmethod
    def validate(cls, hp):
        check_range("vicreg_reg", "var_weight", hp["var_weight"], 0)
        check_range("vicreg_reg", "cov_weight", hp["cov_weight"], 0)
        check_range("vicreg_reg", "gamma", hp["gamma"], 0, low_open=True)

    @classmethod
    def search_space(cls, trial):
        return {"var_weight": trial.suggest_float("var_weight", 1e-3, 1.0, log=True),
                "cov_weight": trial.suggest_float("cov_weight", 1e-3, 10.0, log=True)}

    def attach(self, model, ctx):
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="output")
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self._last: dict[str, tuple[Tensor, Tensor]] = {}

    def loss(self, step: StepContext):
        hp, total, self._pending = self.hparams, None, {}
        for key in self.keys:
            a = step.activations[key]
            if a.shape[0] < 2:  # an unbiased variance needs two samples
                continue
            with torch.autocast(device_type=a.device.type, enabled=False):
                z = feature_matrix(a)
                v, c = both_terms(z, hp["gamma"])
            self._pending[key] = (v.detach(), c.detach())
            term = hp["var_weight"] * v + hp["cov_weight"] * c
            total = term if total is None else total + term
        return total

    def after_step(self, step: StepContext):
        self._last = dict(self._pending)  # tensors: read back once per epoch in diagnostics(), no per-step sync

    def diagnostics(self):
        out = {}
        for key, (v, c) in getattr(self, "_last", {}).items():
            out[f"vicreg_var/{key}"] = float(v)
            out[f"vicreg_cov/{key}"] = float(c)
        return out
