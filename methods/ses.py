"""SES: Spectral Entropy Shaping (seed 000_1ade741b68e5af50.txt, Le Bone 2026, eq. 1-6, Listing 1-2).

For each hooked layer l with batch activations H ∈ R^{B×d_l}:

* eq. 1  Σ = (H − H̄)ᵀ(H − H̄)/(B − 1)
* eq. 2  p_i = λ_i / Σ_j λ_j over the eigenvalues of Σ
* eq. 3  H_l = −Σ_i p_i log p_i ∈ [0, log d_l]
* eq. 4  erank_l = exp(H_l)
* eq. 5  R_SES = Σ_l α_l (H_l − β·log d_l)²   (α_l = 1 as in Listing 1; target erank d_l^β)
* eq. 6  L = L_task + λ·R_SES

Implementation choices (../shared/reference/methods.md §1.3-1.5; the spectral math is in regbench.metrics):

* Convolutional maps (B×C×H×W) use d_l = C. ``conv_reduce="gap"`` averages positions (one row per image, as eq. 1
  is written; the default), ``"positions"`` treats every position as a sample.
* Exact Gram trick, eigenvalues outside autocast, structural zeros dropped, NaN-safe p·log p, eigenvalues only.
* A layer that is constant over the batch (all ReLUs dead) has no spectrum; it is skipped (pitfall P7).
"""
from __future__ import annotations

import math
import warnings

from torch import Tensor

# spectral_entropy (eq. 3 on a [B, d] tensor) is part of this module's public API; its math is shared with the
# engine's effective-rank diagnostic, so it lives in regbench.metrics.
from regbench.metrics import as_matrix, covariance_eigenvalues, spectral_entropy, spectrum_entropy  # noqa: F401

from .base import Method, StepContext, check_range


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
            lam = covariance_eigenvalues(h)
            if lam.sum() <= 0:  # constant layer: no spectrum to shape (pitfall P7)
                continue
            entropy = spectrum_entropy(lam)
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
