"""Metrics computed from model outputs. Pure tensor functions; no training here."""
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
