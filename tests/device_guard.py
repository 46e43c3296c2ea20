"""A CPU-side guard for the CUDA path (issue 16, item 2): every tensor our code creates says where it lives.

The bug class: a factory call with no device (``torch.zeros(bins)``) makes a CPU tensor that later meets a tensor on
the run's device. On a CPU-only machine the two devices are the same, so the mismatch itself can never be observed;
what can be observed is the cause. ``ExplicitDevice`` is a ``TorchFunctionMode`` that sees every torch function call
while it is active and records each *factory* call (zeros, arange, tensor, randperm, …) that

- was made directly by a line of regbench's own code (``regbench/``, ``methods/``, ``datasets/``: the caller
  frame's file), and
- names no device (no ``device=``), takes no device from its data (``torch.as_tensor(t)`` of a tensor ``t`` keeps
  ``t``'s device) and writes into no ``out=`` tensor.

Why this rule and not a fake device: training on a ``meta`` or other non-CPU default device would also move the
tensors that timm, torch.optim and torch itself create (false alarms, or nothing runs), and a CPU tensor of zero
dimensions is accepted next to CUDA tensors by many ops, so "it raised" is not the same as "it is wrong". The rule
"say the device" is checkable on the CPU, is exactly what the GPU needs, and leaves host-side tensors that are meant
to be host-side (dataset pools, RNG states, index plans) visible as ``device="cpu"``. Library frames (torch, timm,
optuna, …) are never the caller we look at, so their internals cannot trip it; a factory call made by torch on our
behalf (``a.new_zeros``, ``zeros_like``) takes its device from a tensor and is not a factory here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import regbench
import regbench.datasets
import regbench.methods

# Functions that create a tensor from sizes or Python data, on the default (CPU) device unless told otherwise.
FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.tensor, torch.as_tensor,
    torch.asarray, torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.normal, torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices,
    torch.sparse_coo_tensor, torch.complex, torch.polar, torch.bartlett_window, torch.hann_window,
    torch.hamming_window, torch.blackman_window, torch.kaiser_window,
}
FACTORIES.discard(torch.complex)  # built from tensors: inherits their device
FACTORIES.discard(torch.polar)

ROOTS = tuple(str(Path(m.__file__).resolve().parent) for m in (regbench, regbench.methods, regbench.datasets))


def _ours(filename: str) -> bool:
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return resolved.startswith(ROOTS)


def _device_from_data(func, args, kwargs) -> bool:
    """True when the call takes its device from a tensor: the data of tensor/as_tensor/asarray, or normal's mean/std."""
    return any(isinstance(a, torch.Tensor) for a in args) or any(isinstance(v, torch.Tensor) for v in kwargs.values())


class ExplicitDevice(TorchFunctionMode):
    """Records (file:line, function) of every implicit-device factory call made by our code while active."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            caller = sys._getframe(1)
            if _ours(caller.f_code.co_filename):
                self.checked += 1
                if (kwargs.get("device") is None and kwargs.get("out") is None
                        and not _device_from_data(func, args, kwargs)):
                    where = f"{Path(caller.f_code.co_filename).resolve()}:{caller.f_lineno}"
                    self.violations.append(f"{where} torch.{func.__name__}(…) without device=")
        return func(*args, **kwargs)

    def report(self) -> str:
        sites = sorted(set(self.violations))
        return (f"{len(sites)} factory call site(s) in regbench code create a tensor on the default device without "
                f"saying so (would be a CPU tensor next to CUDA ones); pass device=<the data's device> or "
                f"device='cpu' for host-side tensors:\n  " + "\n  ".join(sites))


def assert_same_history(got: list[dict], want: list[dict], exact: bool, rel: float = 1e-4, abs_: float = 1e-5) -> None:
    """Per-epoch rows equal: bit for bit where promised (CPU, ``exact``), else within ``rel``/``abs_`` (CUDA: kernels
    such as cuDNN's convolution backward may sum in another order between two runs). Nested dicts compared alike."""
    import pytest

    assert len(got) == len(want)
    if exact:
        assert got == want
        return
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], dict):
                assert_same_history([a[key]], [b[key]], exact, rel, abs_)
            elif isinstance(a[key], (int, float)):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), key
            else:
                assert a[key] == b[key], key
