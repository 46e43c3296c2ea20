"""Metrics computed from model outputs. Pure tensor functions; no training here.

The spectral functions (SES paper, seed 000, eq. 1-4) serve twice: as the SES regularizer (methods/ses.py) and as
the effective-rank diagnostic the engine records for every method. They live in ``regbench.spectral`` (with the
batched many-layer version SES uses) and are re-exported here. Choices, from docs/methods.md §1.4-1.5: the smaller
Gram matrix is eigendecomposed (same nonzero spectrum as the covariance); eigenvalues in float32/float64 with autocast
off; eigenvalues below 1e-6·λ_max are structural zeros; only eigenvalues are used (``eigvalsh``), whose gradient stays
finite at repeated eigenvalues.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from regbench.spectral import (
    as_matrix,
    covariance_eigenvalues,
    spectral_entropy,
    spectrum_entropy,
)

__all__ = [
    "accuracy",
    "as_matrix",
    "calibration",
    "covariance_eigenvalues",
    "effective_rank",
    "expected_calibration_error",
    "generalization_gap",
    "predict",
    "prediction_spread",
    "spectral_entropy",
    "spectrum_entropy",
    "test_prediction_spread",
]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits for x in eval mode, in chunks (x may live on the CPU; batches go to the model's device)."""
    device = next(model.parameters()).device
    outs = [model(x[i:i + batch_size].to(device, non_blocking=True)).float() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(dim=1) == targets.to(logits.device)).float().mean())


def generalization_gap(train_acc: float, eval_acc: float) -> float:
    """Train accuracy minus held-out accuracy, in accuracy units (the SES paper's 'gap')."""
    return train_acc - eval_acc


ECE_BINS = 15  # the convention of Guo et al. 2017, torchmetrics and TorchUncertainty (docs/methods.md §5.3)


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al. 2017, eq. 3): Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|.

    Confidence is the top softmax probability; bin b holds confidences in ((b−1)/M, b/M], so a saturated confidence
    of exactly 1.0 falls in the last bin (torchmetrics gives it a bin of its own; with 15 bins the two agree unless
    some confidences are exactly 1.0, docs/methods.md §5.3).
    """
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets.to(pred.device)).double()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, index, correct)
    return float((acc_sum - conf_sum).abs().sum() / len(conf))


def calibration(logits: Tensor, targets: Tensor) -> dict:
    """ECE (15 bins), negative log-likelihood, the multi-class Brier score (mean Σ_k (p_k − 1[y=k])²) and the
    reliability diagram's bins (Guo et al. 2017, Fig. 1): per confidence bin the sample count, the number correct
    and the confidence sum (rounded), so a report can redraw the diagram and recompute ECE from the store."""
    logits, targets = logits.double(), targets.to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).double()
    brier = (torch.softmax(logits, dim=1) - onehot).pow(2).sum(dim=1).mean()
    conf, pred = torch.softmax(logits, dim=1).max(dim=1)
    index = (torch.ceil(conf * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)  # the bins of expected_calibration_error
    count = torch.bincount(index, minlength=ECE_BINS)
    correct = torch.bincount(index, weights=(pred == targets).double(), minlength=ECE_BINS)
    conf_sum = torch.bincount(index, weights=conf, minlength=ECE_BINS)
    reliability = {"count": count.tolist(), "correct": [round(v) for v in correct.tolist()],
                   "conf_sum": [round(v, 4) for v in conf_sum.tolist()]}
    return {"ece": expected_calibration_error(logits, targets), "nll": float(nll), "brier": float(brier),
            "reliability": reliability}


def prediction_spread(logits: Tensor) -> dict:
    """How many classes a model predicts on a split and how concentrated: ``pred_classes`` (distinct argmax
    classes), ``majority_frac`` (share of the most predicted one), ``count`` (samples) and ``num_classes``. A run
    that predicts one class for every image has collapsed, whatever its accuracy (regbench.degenerate)."""
    pred = logits.argmax(dim=1)
    counts = torch.bincount(pred, minlength=logits.shape[1])
    return {"pred_classes": int((counts > 0).sum()), "majority_frac": float(counts.max()) / max(len(pred), 1),
            "count": len(pred), "num_classes": int(logits.shape[1])}



@torch.no_grad()
def test_prediction_spread(model: nn.Module, splits) -> dict:
    """The final model's ``prediction_spread`` on the test split, under the names a run's final metrics store it:
    ``test_pred_classes``, ``test_majority_frac``, ``test_count`` and ``num_classes``."""
    model.eval()
    facts = prediction_spread(predict(model, splits.x_test))
    return {"test_pred_classes": facts["pred_classes"], "test_majority_frac": facts["majority_frac"],
            "test_count": facts["count"], "num_classes": facts["num_classes"]}


test_prediction_spread.__test__ = False  # not a pytest test when imported into a test module


def effective_rank(h: Tensor) -> float:
    """Eq. 4, exp(H), as a plain float (diagnostic; no gradient). NaN for a constant layer."""
    with torch.no_grad():
        return float(torch.exp(spectral_entropy(h.double())))
