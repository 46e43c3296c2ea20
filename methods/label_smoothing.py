"""Label smoothing (Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture", CVPR 2016,
Sec. 7, "label-smoothing regularization").

Sec. 7 replaces the one-hot target by ``q'(k) = (1 − ε)·δ_{k,y} + ε·u(k)`` with u uniform over the K classes, so the
uniform part includes the true class. The smoothed cross-entropy is then

    H(q', p) = (1 − ε)·H(q, p) + ε·H(u, p) = CE + ε·( mean_k(−log p_k) − CE )

(docs/methods.md §4.3; the same target as ``F.cross_entropy(..., label_smoothing=ε)``).

Our adaptation: the engine always adds the plain task loss ``CE = F.cross_entropy(logits.float(), y)``, so this method
returns only the *difference* ``ε·mean_batch(mean_k(−log p_k) − CE_n)``; task + this term equals torch's smoothed
cross-entropy (value and gradient), whatever other methods are composed with it. Search ε ∈ [0, 0.3]
(docs/methods.md §4.3 [C]; timm's default is 0.1, our default too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, StepContext, check_range


def smoothing_term(logits: Tensor, targets: Tensor, eps: float) -> Tensor:
    """ε·mean_n( mean_k(−log p_nk) − (−log p_{n,y_n}) ): what label smoothing adds to the plain cross-entropy."""
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    uniform_ce = -logp.mean(dim=1)                                    # H(u, p) per sample
    true_ce = -logp.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # H(q, p) per sample
    return eps * (uniform_ce - true_ce).mean()


class LabelSmoothing(Method):
    name = "label_smoothing"
    description = "label smoothing: targets (1-eps)*onehot + eps/K (task + term = torch's smoothed CE)"
    paper = "Szegedy et al. CVPR 2016, Sec. 7"
    defaults = {"eps": 0.1}

    @classmethod
    def validate(cls, hp):
        check_range("label_smoothing", "eps", hp["eps"], 0, 1)

    @classmethod
    def search_space(cls, trial):
        return {"eps": trial.suggest_float("eps", 0.0, 0.3)}

    def wants_activations(self, step: int) -> bool:
        return False  # logits and labels only

    def loss(self, step: StepContext):
        if self.hparams["eps"] == 0:
            return None
        with torch.autocast(device_type=step.logits.device.type, enabled=False):
            return smoothing_term(step.logits, step.targets, self.hparams["eps"])
