"""Confidence penalty (Pereyra, Tucker, Chorowski, Kaiser, Hinton, "Regularizing Neural Networks by Penalizing
Confident Output Distributions", ICLR 2017 workshop, arXiv:1701.06548, Sec. 2 and its thresholded variant).

With p = softmax(logits) and H(p) = −Σ_k p_k log p_k (natural log), the paper's loss is

    L = CE − β·H(p(y|x))                        (plain penalty)
    L = CE + β·max(0, Γ − H(p(y|x)))            (hinge: only entropies below the floor Γ are penalised)

averaged over the batch (docs/methods.md §4.4). Up to a constant the penalty is β·KL(p‖u); label
smoothing is the other direction, KL(u‖p). The paper text was not available here; the formulas and the hinge's sign
follow docs/methods.md §4.4 (with "+": a floor on the entropy; a "−" in front of the hinge, as some summaries print it,
would reward confidence in a minimised loss).

Our adaptation [C]:

* H from ``log_softmax`` as ``−Σ softmax·log_softmax`` in float32 (finite for saturated logits).
* Γ is given as a fraction of the largest possible entropy: ``Γ = threshold_frac·log K``, resolved at attach from
  ``ctx.num_classes``, so one search space serves every dataset. ``threshold_frac = 0`` (default) is the plain
  penalty; ``threshold_frac > 0`` the hinge. Since H ≤ log K, ``threshold_frac = 1`` has exactly the plain penalty's
  gradient (the loss differs by the constant β·log K, which makes it β·KL(p‖u) ≥ 0).
* Search: β log-uniform in [0.01, 2] (docs/methods.md §4.4 [C]); ``threshold_frac`` ∈ {0, 0.25, 0.5, 0.75}, a
  categorical that keeps the plain penalty a candidate (a continuous draw would never hit 0, and 1 would duplicate it).
  The paper's grids could not be read [?].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, StepContext, check_range


def prediction_entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) per row, in nats: −Σ_k p_k log p_k computed from log_softmax."""
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def penalty_from_entropy(h: Tensor, beta: float, threshold: float = 0.0) -> Tensor:
    """Batch mean of −β·H (threshold 0) or of β·max(0, Γ − H) (threshold Γ > 0, in nats), H per sample."""
    if threshold > 0:
        return beta * torch.relu(threshold - h).mean()
    return -beta * h.mean()


class ConfidencePenalty(Method):
    name = "confidence_penalty"
    description = "confidence penalty: -beta*H(p(y|x)), or the hinge beta*max(0, threshold_frac*log K - H)"
    paper = "Pereyra et al. ICLR-W 2017, arXiv:1701.06548, Sec. 2"
    defaults = {"beta": 0.1, "threshold_frac": 0.0}

    @classmethod
    def validate(cls, hp):
        check_range("confidence_penalty", "beta", hp["beta"], 0)
        check_range("confidence_penalty", "threshold_frac", hp["threshold_frac"], 0, 1)

    @classmethod
    def search_space(cls, trial):
        return {"beta": trial.suggest_float("beta", 0.01, 2.0, log=True),
                "threshold_frac": trial.suggest_categorical("threshold_frac", [0.0, 0.25, 0.5, 0.75])}

    def attach(self, model, ctx):
        self.threshold = self.hparams["threshold_frac"] * math.log(ctx.num_classes)  # Γ in nats
        self._entropy = None

    def wants_activations(self, step: int) -> bool:
        return False  # logits only

    def loss(self, step: StepContext):
        with torch.autocast(device_type=step.logits.device.type, enabled=False):
            h = prediction_entropy(step.logits)
        self._entropy = h.detach().mean()
        return penalty_from_entropy(h, self.hparams["beta"], self.threshold)

    def diagnostics(self):
        # Mean prediction entropy of the last training batch: a tensor until here, so no per-step host sync.
        return {} if getattr(self, "_entropy", None) is None else {"confidence_entropy": float(self._entropy)}
