"""Issue 18: no host synchronization inside a training step of any method (docs/architecture.md, "On a GPU"), guarded on
the CPU.

A ``TorchFunctionMode`` records every call that would read a CUDA tensor back to the host — ``.item()``, ``bool()``,
``float()``, ``int()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``.nonzero()`` — made from code under methods/ or
regbench/spectral.py while ``engine.train_step`` runs each registered method and the papers' composites (loss,
backward, optimizer step, after_step). On the CPU such calls are cheap, so only a deliberate, CPU-gated one may
appear, and each is listed here with the line that gates it. Synchronizing linalg (torch's eigh/SVD on CUDA) is
routed per device instead (``regbench.spectral.eigh_backend``, ``dln_entropy.vector_route``) and tested there.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from regbench import engine, models, registry

import regbench.methods.ses as _ses  # noqa: E402
import regbench.spectral as _spectral  # noqa: E402

ROOTS = (os.path.dirname(_ses.__file__) + os.sep, _spectral.__file__)
SYNCS = {Tensor.item, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.tolist, Tensor.cpu,
         Tensor.numpy, Tensor.nonzero, torch.nonzero}
# (file, function): why it may read a value back. Each is gated to the CPU in the code.
ALLOWED = {("ses.py", "loss"): "P7 'every layer constant' check, `if mats[0].device.type == \"cpu\" and ...`"}


class SyncRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if frame.filename.startswith(ROOTS):
                    self.calls.append((os.path.basename(frame.filename), frame.name, frame.lineno,
                                       getattr(func, "__name__", str(func))))
                    break
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_host_reads_made_from_method_code_only():
    with SyncRecorder() as rec:
        x = torch.ones(2)
        x.sum().item(), bool(x.any()), float(x[0])  # here, not in methods/: not recorded
    assert rec.calls == []
    method = registry.build_method("decov")
    model = models.create_model("cnn", 10, (1, 8, 8))
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
    engine.train_step(model, method, capture, torch.optim.SGD(model.parameters(), lr=0.01),
                      torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with SyncRecorder() as rec:
        method.diagnostics()  # per epoch, outside the step: reads its values back with float()
    assert {(f, fn, op) for f, fn, _line, op in rec.calls} == {("decov.py", "diagnostics", "__float__")}


METHODS = registry.method_names() + ["ses+spectral_norm", "shade+dropout"]


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_makes_no_host_sync_call(name):
    torch.manual_seed(0)
    method = registry.build_method(name)
    model = models.create_model("cnn", 10, (1, 8, 8), **method.model_options())
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    engine.train_step(model, method, capture, opt, x, y, step=0)  # first step: lazy state, plans
    with SyncRecorder() as rec:
        for step in range(1, 6):
            engine.train_step(model, method, capture, opt, x, y, step=step)
    bad = [c for c in rec.calls if c[:2] not in ALLOWED]
    assert not bad, f"{name}: host reads in the step: {sorted(set(bad))}"
    if name == "ses":  # the one allowed (CPU-gated) read is seen, so the recorder is on the step's path
        assert {c[:2] for c in rec.calls} == {("ses.py", "loss")}
