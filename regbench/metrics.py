"""Metrics computed from model outputs. Pure tensor functions; no training here.

The spectral functions (SES paper, seed 000, eq. 1-4) live here because they serve twice: as the SES regularizer
(methods/ses.py) and as the effective-rank diagnostic the engine records for every method. Choices, from
../shared/reference/methods.md §1.4-1.5: the smaller Gram matrix is eigendecomposed (same nonzero spectrum as the
covariance); eigenvalues in float32/float64 with autocast off; eigenvalues below 1e-6·λ_max are structural zeros;
only eigenvalues are used (``eigvalsh``), whose gradient stays finite at repeated eigenvalues.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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


_REL_ZERO = 1e-6


def covariance_eigenvalues(h: Tensor) -> Tensor:
    """Eigenvalues of the (unnormalised) covariance of h [n, d], via the smaller Gram matrix. Scale-free callers only."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        x = h if h.dtype == torch.float64 else h.float()
        x = x - x.mean(dim=0, keepdim=True)
        n, d = x.shape
        gram = x @ x.T if n < d else x.T @ x  # same nonzero spectrum (methods.md §1.4)
        lam = torch.linalg.eigvalsh(gram)
    lam = lam.clamp(min=0)
    return torch.where(lam > _REL_ZERO * lam.max().detach(), lam, torch.zeros_like(lam))


def spectrum_entropy(lam: Tensor) -> Tensor:
    """Eq. 2-3 on given eigenvalues; ``p·log p`` written so exact zeros keep finite gradients (pitfall P3)."""
    p = lam / lam.sum()
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()


def spectral_entropy(h: Tensor) -> Tensor:
    """Eq. 3 for activations h of shape [B, d]: a differentiable scalar in [0, log d].

    Isotropic data gives log d, rank-1 data gives 0. Constant data has no spectrum and gives NaN.
    """
    if h.dim() != 2:
        raise ValueError(f"spectral_entropy expects a [B, d] tensor, got shape {tuple(h.shape)}")
    return spectrum_entropy(covariance_eigenvalues(h))


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
