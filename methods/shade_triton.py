"""SHADE's penalty as two Triton kernels: the CUDA path of ``regbench.methods.shade``.

Same math as ``shade.ShadePenalty`` (the reference, and the CPU path): with e = exp(−ReLU(y)) = p(Z=0|y) (Sec. 2.3),
x = y − μ1, d = μ1 − μ0, h = 1 − d/2, one sample's term of eq. 4-5 is x² + 2d·e·x + d²·e, so Ω needs per unit only
Σe, Σx, Σe·x and Σx² — which are also Algorithm 1's batch means (lines 4-5). Passes over each hooked activation:

* forward: ONE read of y (``_sums``), each program reducing a chunk of samples × a block of channels to four
  partial sums in a [R, 4, U] buffer (R chunks, U units of all layers), then one ``sum`` over R (deterministic: no
  atomics). The reference makes ~12 elementwise passes and keeps two float32 activation-sized tensors per layer.
* backward: ONE read of y and ONE write of ∂/∂y (``_grad``), recomputing e instead of saving it:
  ½ ∂Ω/∂y · (1/w) = x − d·q with q = 1[y>0](1 + e·(x − h)) − 1, or x + d·e with ``detach_posterior``.

y is read through its strides as [B, C, P] (P = positions), so channels-last maps and 2-D [B, C] layers need no
copy, and ∂/∂y is written in y's own layout. Loads of bf16/fp16 are widened to float32 in registers. Nothing here
reads a value back to the host: grad_output and the averages stay device pointers (no sync, CUDA-graph safe).
``TRITON_INTERPRET=1`` runs these kernels on CPU tensors, which is how tests/test_shade_triton.py checks them
against the reference to 1e-6 without a GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # optional: ships with torch's CUDA wheels; without it SHADE uses the reference path everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SAMPLES_PER_CHUNK = 1024  # forward: samples one program reduces (R = ⌈K_max / this⌉ chunks, at most MAX_CHUNKS)
MAX_CHUNKS = 256


def available() -> bool:
    return triton is not None


def _blocks(y: Tensor) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C): a ~2048-element tile, wide along whichever axis is contiguous in memory."""
    c = int(y.shape[1])
    if y.stride(1) == 1:  # [B, C] or channels-last: channels are contiguous
        bc = min(64, triton.next_power_of_2(c))
        return max(16, 2048 // bc), bc
    return 1024, 2


def _view3(y: Tensor) -> tuple[int, int, int, int, int] | None:
    """(P, K, stride_b, stride_c, stride_p) of y seen as [B, C, P] (P = 1 for 2-D layers), or None when its
    positions cannot be walked with one stride (then the caller hands the kernel a contiguous copy)."""
    b, c = int(y.shape[0]), int(y.shape[1])
    if y.dim() == 2:
        return 1, b, y.stride(0), y.stride(1), 0
    try:
        flat = y.view(b, c, -1)  # channels-last and contiguous maps are both views
    except RuntimeError:
        return None
    return int(flat.shape[2]), b * int(flat.shape[2]), flat.stride(0), flat.stride(1), flat.stride(2)


if triton is not None:
    @triton.jit
    def _sums(y_ptr, mu1_ptr, part_ptr, C, P, K, s_b, s_c, s_p, per, U, col0,
              ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cs < C
        mu1 = tl.load(mu1_ptr + cs, mask=cm, other=0.0).to(ACC)
        acc_e = tl.zeros([BLOCK_C], dtype=ACC)
        acc_x = tl.zeros([BLOCK_C], dtype=ACC)
        acc_ex = tl.zeros([BLOCK_C], dtype=ACC)
        acc_xx = tl.zeros([BLOCK_C], dtype=ACC)
        start = r * per
        end = tl.minimum(start + per, K)
        for k0 in range(start, end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            b = (ks // P).to(tl.int64)
            p = (ks % P).to(tl.int64)
            m = (ks < end)[:, None] & cm[None, :]
            offs = b[:, None] * s_b + p[:, None] * s_p + cs[None, :].to(tl.int64) * s_c
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
            x = tl.where(m, y - mu1[None, :], 0.0)
            e = tl.where(m, tl.exp(-tl.maximum(y, 0.0)), 0.0)
            acc_e += tl.sum(e, axis=0)
            acc_x += tl.sum(x, axis=0)
            acc_ex += tl.sum(e * x, axis=0)
            acc_xx += tl.sum(x * x, axis=0)
        out = part_ptr + r.to(tl.int64) * 4 * U + col0 + cs
        tl.store(out, acc_e, mask=cm)
        tl.store(out + U, acc_x, mask=cm)
        tl.store(out + 2 * U, acc_ex, mask=cm)
        tl.store(out + 3 * U, acc_xx, mask=cm)

    @triton.jit
    def _grad(y_ptr, g_ptr, mu1_ptr, d_ptr, h_ptr, go_ptr, scale, C, P, K, s_b, s_c, s_p, g_b, g_c, g_p,
              DETACH: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cs < C
        m = (ks < K)[:, None] & cm[None, :]
        b = (ks // P).to(tl.int64)
        p = (ks % P).to(tl.int64)
        c64 = cs[None, :].to(tl.int64)
        y = tl.load(y_ptr + b[:, None] * s_b + p[:, None] * s_p + c64 * s_c, mask=m, other=0.0).to(ACC)
        mu1 = tl.load(mu1_ptr + cs, mask=cm, other=0.0).to(ACC)[None, :]
        d = tl.load(d_ptr + cs, mask=cm, other=0.0).to(ACC)[None, :]
        x = y - mu1
        e = tl.exp(-tl.maximum(y, 0.0))
        if DETACH:
            g = x + d * e
        else:
            h = tl.load(h_ptr + cs, mask=cm, other=0.0).to(ACC)[None, :]
            q = tl.where(y > 0.0, 1.0 + e * (x - h), 0.0) - 1.0
            g = x - d * q
        g = g * (tl.load(go_ptr).to(ACC) * scale)
        tl.store(g_ptr + b[:, None] * g_b + p[:, None] * g_p + c64 * g_c, g.to(g_ptr.dtype.element_ty), mask=m)


def _acc(calc: torch.dtype):
    return tl.float64 if calc == torch.float64 else tl.float32


def chunks(ys) -> int:
    """R, the number of sample chunks of the forward's partial-sum buffer (the same for every layer)."""
    k_max = max(y.numel() // max(int(y.shape[1]), 1) for y in ys)
    return max(1, min(MAX_CHUNKS, -(-k_max // SAMPLES_PER_CHUNK)))


class TritonShadePenalty(torch.autograd.Function):
    """weight · Ω_SHADE (eq. 1, 4-5) over ``ys``, as ``shade.ShadePenalty`` computes it, with the fused kernels.

    ``plan`` is a ``shade._Plan`` built with ``fused=True``: it holds the averages' snapshot (μ1, d, h), the [R, 4, U]
    partial sums, the [4, U] totals (Σe, Σx, Σe·x, Σx²; the first three are ``plan.sums`` for ``after_step``) and
    the per-layer offsets and scales."""

    @staticmethod
    def forward(ctx, plan, *ys: Tensor) -> Tensor:
        calc, layers = plan.prepare(ys)
        acc, offsets = _acc(calc), plan.averages.offsets
        rows, total = plan.partials.shape[0], plan.partials.shape[2]
        geometry, kept = [], []
        for i, y in enumerate(ys):
            view = _view3(y)
            if view is None:
                y = y.contiguous()
                view = _view3(y)
            c = int(y.shape[1])
            p, k, s_b, s_c, s_p = view
            bk, bc = _blocks(y)
            per = -(-(-(-k // rows)) // bk) * bk  # samples per chunk, a multiple of the tile
            _sums[(rows, triton.cdiv(c, bc))](y, plan.mu1[offsets[i]:], plan.partials, c, p, k, s_b, s_c, s_p, per,
                                              total, offsets[i], ACC=acc, BLOCK_K=bk, BLOCK_C=bc)
            geometry.append((c, p, k, s_b, s_c, s_p, bk, bc))
            kept.append(y)
        torch.sum(plan.partials, 0, out=plan.sums4)
        plan.omega = plan.penalty()
        ctx.plan, ctx.geometry, ctx.calc = plan, geometry, calc
        ctx.save_for_backward(plan.mu1, plan.d, plan.h, *kept)
        return (plan.weight * plan.omega).to(torch.promote_types(calc, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        mu1, d, h, *ys = ctx.saved_tensors  # unpacking checks that no later forward overwrote the snapshot
        plan, offsets = ctx.plan, ctx.plan.averages.offsets
        go = grad_output.reshape(()).contiguous()
        grads: list[Tensor | None] = [None, *([None] * len(ys))]
        for i, (y, (c, p, k, s_b, s_c, s_p, bk, bc)) in enumerate(zip(ys, ctx.geometry)):
            if not ctx.needs_input_grad[i + 1]:
                continue
            g = torch.empty_like(y)  # y's layout (a contiguous copy's, for the rare non-viewable map)
            _, _, g_b, g_c, g_p = _view3(g)
            lo = offsets[i]
            _grad[(triton.cdiv(k, bk), triton.cdiv(c, bc))](
                y, g, mu1[lo:], d[lo:], h[lo:], go, plan.layers[i].scale, c, p, k, s_b, s_c, s_p, g_b, g_c, g_p,
                DETACH=plan.detach_posterior, ACC=_acc(ctx.calc), BLOCK_K=bk, BLOCK_C=bc)
            grads[i + 1] = g
        return tuple(grads)
