"""SES: Spectral Entropy Shaping (seed 000_1ade741b68e5af50.txt, Le Bone 2026, eq. 1-6, Listing 1-2).

For each hooked layer l with batch activations H ∈ R^{B×d_l}:

* eq. 1  Σ = (H − H̄)ᵀ(H − H̄)/(B − 1)
* eq. 2  p_i = λ_i / Σ_j λ_j over the eigenvalues of Σ
* eq. 3  H_l = −Σ_i p_i log p_i ∈ [0, log d_l]
* eq. 4  erank_l = exp(H_l)
* eq. 5  R_SES = Σ_l α_l (H_l − β·log d_l)²   (α_l = 1 as in Listing 1; target erank d_l^β)
* eq. 6  L = L_task + λ·R_SES

Implementation choices (../shared/reference/methods.md §1.3-1.5):

* Convolutional maps (B×C×H×W) use d_l = C. ``conv_reduce="gap"`` averages positions (one row per image, as eq. 1
  is written; the default), ``"positions"`` treats every position as a sample.
* Exact Gram trick: Σ and XXᵀ share their nonzero eigenvalues, so the smaller of the two is eigendecomposed.
* Eigenvalues in float32 (float64 if the input is float64) with autocast off: a bf16 covariance alone costs 1e-3 in H.
* Eigenvalues below 1e-6·λ_max are structural zeros (rank ≤ B−1) and are set to 0; ``p·log p`` is evaluated as
  ``p·log(where(p > 0, p, 1))`` because ``xlogy``/``entr`` give NaN gradients at exact zeros (pitfall P3).
* Only eigenvalues are used (``eigvalsh``): their gradient is finite at repeated eigenvalues, eigenvectors' is not.
* A layer that is constant over the batch (all ReLUs dead) has no spectrum; it is skipped (pitfall P7).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .base import Method, StepContext, check_range

_REL_ZERO = 1e-6


def _eigenvalues(h: Tensor) -> Tensor:
    """Eigenvalues of the (unnormalised) covariance of h [n, d], via the smaller Gram matrix. Scale-free callers only."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        x = h if h.dtype == torch.float64 else h.float()
        x = x - x.mean(dim=0, keepdim=True)
        n, d = x.shape
        gram = x @ x.T if n < d else x.T @ x  # same nonzero spectrum (methods.md §1.4)
        lam = torch.linalg.eigvalsh(gram)
    lam = lam.clamp(min=0)
    return torch.where(lam > _REL_ZERO * lam.max().detach(), lam, torch.zeros_like(lam))


def _entropy_of(lam: Tensor) -> Tensor:
    p = lam / lam.sum()
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()


def spectral_entropy(h: Tensor) -> Tensor:
    """Eq. 3 for activations h of shape [B, d]: a differentiable scalar in [0, log d].

    Isotropic data gives log d, rank-1 data gives 0. Constant data has no spectrum and gives NaN.
    """
    if h.dim() != 2:
        raise ValueError(f"spectral_entropy expects a [B, d] tensor, got shape {tuple(h.shape)}")
    return _entropy_of(_eigenvalues(h))


def as_matrix(a: Tensor, conv_reduce: str = "gap") -> Tensor:
    """[B, d] view of a captured activation: flatten trailing 1s, reduce conv maps to d = channels."""
    if a.dim() > 2 and all(s == 1 for s in a.shape[2:]):
        return a.flatten(1)
    if a.dim() == 2:
        return a
    if conv_reduce == "gap":
        return a.flatten(2).mean(dim=2)
    return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])  # positions as samples


def effective_rank(h: Tensor) -> float:
    """Eq. 4, exp(H), as a plain float (diagnostic; no gradient). NaN for a constant layer."""
    with torch.no_grad():
        return float(torch.exp(spectral_entropy(h.double())))


class SES(Method):
    name = "ses"
    description = "Spectral Entropy Shaping: pull each hooked layer's spectral entropy to beta*log(d)"
    paper = "Le Bone 2026, seed 000, eq. 1-6"
    defaults = {"lam": 0.01, "beta": 0.7, "layers": "auto", "conv_reduce": "gap"}

    @classmethod
    def validate(cls, hp):
        check_range("ses", "beta", hp["beta"], 0, 1, low_open=True, high_open=True)
        check_range("ses", "lam", hp["lam"], 0)
        if hp["conv_reduce"] not in ("gap", "positions"):
            from regbench.errors import HparamError
            raise HparamError(f"ses.conv_reduce={hp['conv_reduce']!r} is not one of: gap, positions")

    @classmethod
    def search_space(cls, trial):
        # Ranges from the paper: beta 0.3-0.9 (Exp. 2, P6), lam 1e-3-1e-1 (Table 4); hook sets (Table 6: 9/5/3) as
        # every feature layer vs the pooled one, since last:K must exist on every model family.
        return {
            "beta": trial.suggest_float("beta", 0.3, 0.9),
            "lam": trial.suggest_float("lam", 1e-3, 1e-1, log=True),
            "layers": trial.suggest_categorical("layers", ["all", "pool"]),
        }

    def attach(self, model, ctx):
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="output")
        self.last_entropy: dict[str, Tensor] = {}
        self._pending: dict[str, Tensor] = {}
        self._warned_cap = False

    def loss(self, step: StepContext):
        beta, total = self.hparams["beta"], None
        self._pending = {}
        for key in self.keys:
            h = as_matrix(step.activations[key], self.hparams["conv_reduce"])
            n, d = h.shape
            lam = _eigenvalues(h)
            if lam.sum() <= 0:  # constant layer: no spectrum to shape (pitfall P7)
                continue
            entropy = _entropy_of(lam)
            self._warn_if_unreachable(n, d)
            term = (entropy - beta * math.log(d)) ** 2
            total = term if total is None else total + term
            self._pending[key] = entropy.detach()
        return None if total is None else self.hparams["lam"] * total

    def after_step(self, step):
        self.last_entropy = dict(self._pending)  # tensors: read back once per epoch in diagnostics(), no step sync

    def _warn_if_unreachable(self, n: int, d: int) -> None:
        # After centring rank ≤ n−1, so H ≤ log(min(n−1, d)); a higher target never vanishes (pitfall P6).
        if not self._warned_cap and d > 1 and n > 2 and self.hparams["beta"] * math.log(d) > math.log(min(n - 1, d)):
            self._warned_cap = True
            warnings.warn(f"ses.beta={self.hparams['beta']} targets erank {d ** self.hparams['beta']:.1f} but a batch "
                          f"of {n} caps it at {min(n - 1, d)}; the penalty cannot reach zero", stacklevel=2)

    def diagnostics(self):
        return {f"ses_entropy/{k}": float(v) for k, v in self.last_entropy.items()}
