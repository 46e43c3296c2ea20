"""Evaluation of a run's model: one epoch's history row (accuracies, validation NLL, calibration, effective ranks)
and the final shift-set accuracies. Called by the training loop (regbench/engine.py) on each run of a group."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from regbench.config import RunConfig
from regbench.device_data import DeviceData
from regbench.metrics import accuracy, as_matrix, calibration, effective_rank, generalization_gap, predict


def evaluate_shift(model, shift) -> dict[str, float]:
    """Accuracy of the final model on every (corruption, severity) block of a shift set, in eval mode, plus the mean
    over the benchmark corruptions × severities and, separately, over the extra ones (CIFAR-C convention)."""
    model.eval()
    out, bench, extra = {}, [], []
    for i, (corruption, severity) in enumerate(shift.blocks):
        x, y = shift.block(i)  # one block normalized at a time: the whole set never sits in memory as float32
        acc = accuracy(predict(model, x), y)
        # The key says which family a block belongs to, so reports need no list of corruption names.
        family = "shift" if corruption in shift.benchmark else "shift_extra"
        out[f"{family}/{corruption}/{severity}"] = acc
        (bench if family == "shift" else extra).append(acc)
    if bench:
        out["shift_acc"] = sum(bench) / len(bench)
    if extra:
        out["shift_extra_acc"] = sum(extra) / len(extra)
    return out


@torch.no_grad()
def train_rows(config: RunConfig, n_train: int) -> torch.Tensor | None:
    """The training rows train accuracy is measured on: None for the whole split (the default), else the first
    ``train_acc_sample`` of a permutation drawn from ``split_seed`` alone (same rows for every method and seed, so the
    paired comparison holds), sorted. A sample at least as large as the split is the whole split."""
    n = config.train_acc_sample
    if n is None or n >= n_train:
        return None
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.split_seed), device="cpu")
    return order[:n].sort().values


def predict_train(model, splits, data: DeviceData | None = None, batch_size: int = 1024,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """``metrics.predict(model, splits.x_train)``, from the device-resident train split when there is one (no
    host→device copy of the whole train split every epoch). Same rows bit for bit (DeviceData's normalization
    table), same chunks, no augmentation, no channels-last restride: the same logits as from the host copy."""
    if data is None or not data.resident:
        return predict(model, splits.x_train if rows is None else splits.x_train[rows], batch_size=batch_size)
    x = data.x if rows is None else data.x[rows.to(data.x.device)]
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        outs.append(model(data.normalize(xb) if data.table is not None else xb).float())
    return torch.cat(outs)


def evaluate_epoch(model, splits, config, capture, diag_keys, erank_x, data: DeviceData | None = None
                   ) -> dict[str, float]:
    """One epoch's history row: train/val(/test) accuracy and val NLL in eval mode, plus the diagnostics (erank of the
    captured layers on ``erank_x``). Called per run of a group, each on its own model; ``data``: the group's
    resident train split, read for train accuracy instead of the host copy."""
    model.eval()
    val_logits = predict(model, splits.x_val)
    rows = train_rows(config, len(splits.y_train))  # None: the whole split
    row = {"train_acc": accuracy(predict_train(model, splits, data, rows=rows),
                                 splits.y_train if rows is None else splits.y_train[rows]),
           "val_acc": accuracy(val_logits, splits.y_val),
           "val_nll": float(F.cross_entropy(val_logits.float(), splits.y_val.to(val_logits.device)))}
    if config.eval_test:
        test_logits = predict(model, splits.x_test)
        row["test_acc"] = accuracy(test_logits, splits.y_test)
        row.update({f"test_{k}": v for k, v in calibration(test_logits, splits.y_test).items()})
    row["gap"] = generalization_gap(row["train_acc"], row.get("test_acc", row["val_acc"]))
    # Effective rank (eq. 4) of every diagnostic layer on a fixed held-out batch, eval mode, GAP for conv maps.
    train_wanted, capture.wanted = capture.wanted, set(diag_keys)
    capture.active = True
    with torch.no_grad():
        predict(model, erank_x, batch_size=len(erank_x))
    capture.active = False
    for key in diag_keys:
        h = as_matrix(capture.store[key]).float()
        row[f"erank/{key}"] = effective_rank(h)
        row[f"width/{key}"] = h.shape[1]  # d of the layer: SES's target erank is d^β (eq. 5), drawn in the report
    capture.clear()
    capture.wanted = train_wanted
    return row
