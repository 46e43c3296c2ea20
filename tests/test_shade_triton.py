"""SHADE's fused Triton kernels (methods/shade_triton.py, the CUDA path) against the reference ``ShadePenalty``.

No GPU needed: ``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors. The variable must be set before Triton is
imported, so the checks run in a fresh interpreter (one subprocess for all of them: the interpreter is slow to start).
Skipped, with the reason, where Triton is not installed or its interpreter cannot run a trivial kernel here.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import torch, triton, triton.language as tl
    @triton.jit
    def k(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)
    x = torch.zeros(8)
    k[(1,)](x, BLOCK=8)
    assert x.sum().item() == 8.0
""")

CHECKS = textwrap.dedent("""
    import torch
    from regbench import engine, models
    from regbench.methods.shade import SHADE, ShadeAverages, ShadePenalty, _Plan
    from regbench.methods.shade_triton import TritonShadePenalty
    from regbench.methods.base import StepContext

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def layers(dtype):
        # conv maps, a 3-D layer, a 2-D layer, channels-last, a strided view whose positions need a copy, and a
        # layer with K = 2400 samples per channel (several chunks of the forward's partial sums)
        ys = [torch.randn(2, 3, 4, 5, generator=g), torch.randn(4, 2, 6, generator=g), torch.randn(5, 7, generator=g),
              torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 8, 5, generator=g)[:, :, ::2, :], torch.randn(8, 3, 300, generator=g) * 3 + 1]
        ys[0][0, 0, 0, :2] = 0.0  # y = 0 exactly: ReLU's convention (flat posterior) in both
        return [y.to(dtype) for y in ys]

    tol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 2e-6), torch.bfloat16: (2e-6, 1e-5)}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for reduction in ("sum", "mean"):
            for detach in (False, True):
                ys = layers(dtype)
                units = [y.shape[1] for y in ys]
                state = torch.float64 if dtype == torch.float64 else torch.float32
                av = ShadeAverages(list("abcdef"), units, dtype=state)
                av.mu0.copy_(torch.randn(sum(units), generator=g) - 1)
                av.mu1.copy_(torch.randn(sum(units), generator=g) + 1)
                got = []
                for fn in (ShadePenalty, TritonShadePenalty):
                    leaves = [y.clone().requires_grad_() for y in ys]
                    plan = _Plan(av, 0.25, reduction, detach, fused=fn is TritonShadePenalty)
                    out = fn.apply(plan, *leaves)
                    grads = torch.autograd.grad(out, leaves)
                    got.append((out.detach(), grads, plan.batch_means()))
                (v0, g0, m0), (v1, g1, m1) = got
                case = (dtype, reduction, detach)
                assert v1.dtype == v0.dtype, case
                assert abs(v1 - v0) <= tol[dtype][0] * abs(v0), (case, v0, v1)
                for a, b in zip(g1, g0):
                    assert a.dtype == b.dtype and a.stride() == b.stride(), case
                    if dtype == torch.bfloat16:  # both round the same float32 value to bf16: at most 1 ulp apart
                        assert ((a.float() - b.float()).abs() <= b.float().abs() * 2 ** -7 + 1e-30).all(), case
                    else:
                        assert (a - b).abs().max() <= tol[dtype][0] * b.abs().max(), case
                for a, b in zip(m1, m0):  # Algorithm 1's inputs (batch means per unit)
                    assert (a - b).abs().max() <= tol[dtype][1] * b.abs().max(), case
    print("penalty ok")

    def cnn1d_acts(seed):
        gen = torch.Generator().manual_seed(seed)
        shapes = {"block1.act<input": (3, 32, 4), "block2.act<input": (3, 32, 4), "block3.act<input": (3, 32, 2),
                  "act_fc<input": (3, 128)}
        return {k: (torch.randn(s, generator=gen, dtype=torch.float64) * 1.5 + 0.2).requires_grad_()
                for k, s in shapes.items()}

    # Algorithm 1 through the method: three steps, the same losses and the same moving averages (float64)
    methods = {}
    for kernel in ("torch", "triton"):
        m = SHADE({"weight": 0.1})
        model = models.create_model("cnn1d", 10, (40,))
        m.attach(model, engine.ModelContext(model, engine.ActivationCapture(model), 10, (40,)))
        m.kernel = kernel
        losses = []
        for t in range(3):
            step = StepContext(None, None, None, None, activations=cnn1d_acts(t))
            loss = m.loss(step)
            loss.backward()
            m.after_step(step)
            losses.append(loss.item())
        methods[kernel] = (m, losses)
    (ref, l0), (fused, l1) = methods["torch"], methods["triton"]
    assert fused._plan.fused and not ref._plan.fused
    assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(l1, l0)), (l0, l1)
    for name in ("p0", "p1", "mu0", "mu1"):
        a, b = getattr(fused.averages, name), getattr(ref.averages, name)
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), name
    assert fused.diagnostics()["shade_triton"] == 1.0 and "shade_triton" not in ref.diagnostics()

    # a stale graph is refused by the fused path too
    first = fused.loss(StepContext(None, None, None, None, activations=cnn1d_acts(5)))
    fused.loss(StepContext(None, None, None, None, activations=cnn1d_acts(6)))
    try:
        first.backward()
        raise SystemExit("stale backward accepted")
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e), e
    print("algorithm 1 ok")

    # real training steps on the 2-D cnn (float32, conv maps), through engine.train_step: same weights and state
    weights = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        m = SHADE({"weight": 0.01})
        model = models.create_model("cnn", 10, (1, 8, 8))
        capture = engine.ActivationCapture(model)
        m.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
        m.kernel = kernel
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8)
        for _ in range(2):
            engine.train_step(model, m, capture, opt, x, y)
        weights[kernel] = ([p.detach().clone() for p in model.parameters()], m.averages.mu1.clone())
    for a, b in zip(weights["triton"][0], weights["torch"][0]):
        assert (a - b).abs().max() <= 1e-6 * max(b.abs().max(), 1e-3)
    assert (weights["triton"][1] - weights["torch"][1]).abs().max() <= 2e-6 * weights["torch"][1].abs().max()
    print("train step ok")
""")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_triton_kernels_equal_the_reference_penalty_gradient_and_algorithm_1(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the CUDA path's kernels cannot be checked)")
    probe = _run(PROBE, tmp_path)
    if probe.returncode:
        pytest.skip(f"Triton's interpreter (TRITON_INTERPRET=1) cannot run here: {probe.stderr.strip()[-300:]}")
    result = _run(CHECKS, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["penalty", "ok", "algorithm", "1", "ok", "train", "step", "ok"]


def test_the_reference_is_the_cpu_path_and_triton_is_picked_on_cuda_only():
    from regbench.methods import shade, shade_triton

    assert shade.kernel_for("cpu") == "torch"
    assert shade.kernel_for("cuda") == ("triton" if shade_triton.available() else "torch")


def test_compiled_kernels_on_cuda_equal_the_cpu_reference(test_device):
    """The GPU check's half of the story (REGBENCH_TEST_DEVICE=cuda): the kernels compiled for the GPU, not
    interpreted, give the CPU reference's value, gradients and Algorithm 1 batch means (float32 and bf16 inputs,
    contiguous, channels-last, 2-D and 3-D layers)."""
    if not test_device.startswith("cuda"):
        pytest.skip("compiled kernels need CUDA: run with REGBENCH_TEST_DEVICE=cuda (benchmarks/gpu_check.sh does)")
    import torch

    from regbench.methods import shade_triton
    from regbench.methods.shade import ShadeAverages, ShadePenalty, _Plan

    assert shade_triton.available(), "triton is not importable on this CUDA machine: SHADE falls back to torch"
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 16, 6, 6, generator=g), torch.randn(64, 128, generator=g),
            torch.randn(8, 3, 300, generator=g) * 3 + 1,
            torch.randn(8, 32, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        units = [y.shape[1] for y in base]
        got = []
        for fn, device in ((ShadePenalty, "cpu"), (shade_triton.TritonShadePenalty, test_device)):
            av = ShadeAverages(list("abcd"), units, device=device)
            leaves = [y.to(device=device, dtype=dtype).requires_grad_() for y in base]
            plan = _Plan(av, 0.25, "mean", False, fused=fn is not ShadePenalty)
            out = fn.apply(plan, *leaves)
            grads = torch.autograd.grad(out, leaves)
            got.append((out.detach().float().cpu(), [gr.float().cpu() for gr in grads],
                        [m.float().cpu() for m in plan.batch_means()]))
        (v0, g0, m0), (v1, g1, m1) = got
        assert abs(v1 - v0) <= tol * abs(v0), (dtype, v0, v1)
        for a, b in [*zip(g1, g0), *zip(m1, m0)]:
            assert (a - b).abs().max() <= tol * b.abs().max(), dtype
