"""Spectral entropy of activation batches (SES paper, seed 000, eq. 1-4 and 14; Sec. 5.2), one layer or many at once.

Single matrix (the engine's effective-rank diagnostic, ``regbench.metrics`` re-exports these):
``covariance_eigenvalues``, ``spectrum_entropy``, ``spectral_entropy``, ``as_matrix``.

Many layers per step (SES): ``entropies(mats, path=...)`` returns every layer's entropy in one tensor, computed with
as few kernel launches and eigensolver calls as the shapes allow (docs/methods.md §1.4-1.5, §1.7):

* matrices of equal shape are stacked, centred and multiplied in one batched matmul to their *min-side* Gram
  (XᵀX when d ≤ n, XXᵀ when n < d: same nonzero spectrum, cost O(min(n, d)³) for the eigensolver);
* Grams of equal size m = min(n, d) and dtype go to ONE batched eigensolver call (``batched_eigh``): torch's
  ``eigh`` on the CPU (the reference), CuPy's batched cuSOLVER solver on CUDA when installed (``regbench[cuda]``;
  no host sync, no per-matrix loop; see ``eigh_backend`` for why not a polynomial), else torch's (one host sync
  per size, not per layer, P5);
* autocast off, float32 (float64 when the input is float64); eigenvalues below 1e-7·λ_max (1e-12 in float64) are
  structural zeros (the single-matrix functions keep their 1e-6 threshold, see REL_ZERO_BATCHED); p·log p finite
  at p = 0 (P2-P4); a layer that is constant over the batch is flagged and gets H = 0, no gradient (P7);
* the whole exact path is ONE autograd node (``_ExactEntropies``) with the closed-form backward
  dH/dG = V diag(−(log p + H)/S) Vᵀ, dX = 2·X_c·dG: the value and gradient of autograd through eigvalsh (tested),
  without its dozen small nodes and two extra full-size passes per layer.

Approximate paths (Sec. 5.2), both working on the same min-side Grams C (m×m, trace S = ‖X_c‖²_F exact):

* ``lowrank``: randomized range finder (Halko et al.; ``niter`` power iterations, ``rank`` + ``oversample``
  columns, detached) then Rayleigh-Ritz: the top ``rank`` eigenvalues of QᵀCQ, differentiable through a small
  batched eigvalsh. The tail mass S − Σ top-k is spread uniformly over the remaining r − k directions
  (r = the rank cap min(n−1, d), docs/methods.md §1.7). **Bias:** upward. Ritz values underestimate the top eigenvalues
  (more mass goes to the tail) and the uniform tail is the maximum-entropy completion, so H_lowrank ≥ H in practice.
  Layers with m ≤ rank + oversample are computed exactly.
* ``hutchinson``: eq. 14 normalised, H = −(ℓ/S)·tr f(C/ℓ) − log(ℓ/S) with f(u) = u log u on [0, 1], ℓ ≥ λ_max
  (power-iteration estimate × 1.25, capped by S), tr f(·) by Hutchinson with ``probes`` Rademacher vectors and a
  degree-``degree`` Chebyshev interpolant of f, structural zeros (m − r of them) corrected for.
  **Bias:** the probe average is unbiased for tr p(C/ℓ) (variance ∝ 1/probes, so the penalty is noisy); the bias is
  the polynomial error of u log u, worst near u = 0 (the log singularity of its derivative), i.e. on many small
  eigenvalues: it grows with the number of near-zero eigenvalues and shrinks like 1/degree².
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

REL_ZERO = 1e-6        # single-matrix functions: eigenvalues below REL_ZERO·λ_max are structural zeros (P2)
# The batched path works on the min side only, whose structural zeros (the centring null vector of a Gram, dead
# units) come out at ~eps·λ_max, so its threshold is ≈ eps. On real activations (trained ResNet-18 layer1, cnn on
# 3×32×32) there are genuine eigenvalues at 1e-7…1e-5·λ_max: a 1e-6 threshold dropped them and moved H by up to
# 2.7e-5 from eq. 3; with 1e-7 float32 stays within 9e-7 of eq. 3 (float64, unthresholded) on those, on random ReLU
# features and on rank-deficient (dead-unit) covariances, while 3e-8 lets dead-unit noise in (1.3e-6).
REL_ZERO_BATCHED = {torch.float64: 1e-12, torch.float32: 1e-7}


def rel_zero(dtype: torch.dtype) -> float:
    """Relative zero threshold of the batched path for this dtype (REL_ZERO_BATCHED; float32's for others)."""
    return REL_ZERO_BATCHED.get(dtype, REL_ZERO_BATCHED[torch.float32])

CONSTANT_REL = 1e-10   # P7: a layer whose centred energy is below this fraction of n·‖mean‖² is constant (its
                       # float32 "spread" is the rounding of the mean, ~1e-14 of it): std/|mean| < 1e-5 is constant
PATHS = ("exact", "lowrank", "hutchinson")


# ---- single matrix ------------------------------------------------------------------------------------------------

def covariance_eigenvalues(h: Tensor) -> Tensor:
    """Eigenvalues of the (unnormalised) covariance of h [n, d], via the smaller Gram matrix. Scale-free callers
    only."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        x = h if h.dtype == torch.float64 else h.float()
        x = x - x.mean(dim=0, keepdim=True)
        n, d = x.shape
        gram = x @ x.T if n < d else x.T @ x  # same nonzero spectrum (docs/methods.md §1.4)
        lam = torch.linalg.eigvalsh(gram)
    lam = lam.clamp(min=0)
    # The batched path's per-dtype threshold: 1e-6 dropped real eigenvalues of trained ResNet layer1 features
    # (ΔH ≈ 2e-5), while 1e-12 in float64 / 1e-7 in float32 stays above the solvers' noise.
    return torch.where(lam > rel_zero(x.dtype) * lam.max().detach(), lam, torch.zeros_like(lam))


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
    """[B, d] view of a captured activation: flatten trailing 1s, reduce conv maps to d = channels.

    ``gap``: global average over positions, one row per sample (eq. 1 as written). ``positions``: every spatial
    position is a sample, rows = B·H·W (docs/methods.md §1.3, options A and B)."""
    if a.dim() > 2 and all(s == 1 for s in a.shape[2:]):
        return a.flatten(1)
    if a.dim() == 2:
        return a
    if conv_reduce == "gap":
        return a.flatten(2).mean(dim=2)
    return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])  # positions as samples


def entropy_matrix(a: Tensor, conv_reduce: str = "gap") -> Tensor:
    """``as_matrix`` for entropy computations only: GAP as a *sum* over positions.

    Eq. 3 is scale-invariant, so the sum gives the same H as the mean (to rounding), and its backward is a
    broadcast view where the mean's materialises a full-size division (~3× the cost on a [128, 32, 40] map)."""
    if a.dim() > 2 and conv_reduce == "gap" and not all(s == 1 for s in a.shape[2:]):
        # bf16/fp16 maps (autocast) are summed into float32 directly: no rounding to 8 bits before the spectrum
        return a.flatten(2).sum(dim=2, dtype=None if a.dtype == torch.float64 else torch.float32)
    return as_matrix(a, conv_reduce)


# ---- many matrices: min-side Grams grouped by size --------------------------------------------------------------

class _Plan:
    """How a list of shapes is grouped; cached per shape signature (shapes rarely change between steps)."""

    def __init__(self, sig, side: str):
        by_shape: dict[tuple, list[int]] = {}
        for i, (shape, dtype, _dev) in enumerate(sig):
            by_shape.setdefault((shape, dtype), []).append(i)
        self.shape_groups = []  # (indices, n, d, use_rows_gram)
        for (shape, _dtype), idx in by_shape.items():
            n, d = shape
            rows = n < d if side == "min" else side == "gram"
            self.shape_groups.append((idx, n, d, rows))
        by_size: dict[tuple, list[int]] = {}  # (m, dtype) -> positions in shape_groups
        for g, (idx, n, d, rows) in enumerate(self.shape_groups):
            by_size.setdefault((n if rows else d, sig[idx[0]][1]), []).append(g)
        self.size_groups = list(by_size.items())
        order = [i for _key, gs in self.size_groups for g in gs for i in self.shape_groups[g][0]]
        self.identity = order == list(range(len(sig)))
        self._order = torch.tensor(order, dtype=torch.long, device="cpu")  # host plan; order(device) copies it once
        self._inverse = torch.empty(len(order), dtype=torch.long, device="cpu")
        self._inverse[self._order] = torch.arange(len(order), device="cpu")
        self._on: dict = {}

    def order(self, device) -> Tensor:
        """Plan position → input position, on ``device`` (copied there once, not per step)."""
        if ("order", device) not in self._on:
            self._on[("order", device)] = self._order.to(device)
        return self._on[("order", device)]

    def inverse(self, device) -> Tensor:
        """Input position → plan position, on ``device``."""
        if ("inverse", device) not in self._on:
            self._on[("inverse", device)] = self._inverse.to(device)
        return self._on[("inverse", device)]


_PLANS: dict[tuple, _Plan] = {}


def _plan(mats: Sequence[Tensor], side: str) -> _Plan:
    sig = tuple((tuple(m.shape), m.dtype, m.device) for m in mats) + (side,)
    plan = _PLANS.get(sig)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[sig] = _Plan(sig[:-1], side)
    return plan


def min_side_grams(mats: Sequence[Tensor], side: str = "min"):
    """Centre each [n, d] matrix and form its Gram, batched by shape, then grouped by size.

    Returns (plan, groups) with groups = [(grams [k, m, m], floor [k], rank_cap [k]) per (m, dtype)], in plan order.
    ``floor``: a layer whose centred energy (the Gram's trace) is at most CONSTANT_REL·n·‖mean‖² is constant (P7).
    ``rank_cap`` = min(n − 1, d), the largest rank a centred batch can have (P6). ``side``: "min" (the rule of §1.4),
    or "cov"/"gram" to force one side (tests).
    """
    plan = _plan(mats, side)
    grams, floors, caps = [], [], []
    for idx, n, d, rows in plan.shape_groups:
        x = mats[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([mats[i] for i in idx])
        if x.dtype != torch.float64:
            x = x.float()
        mean = x.mean(dim=1, keepdim=True)
        xc = x - mean
        g = xc @ xc.mT if rows else xc.mT @ xc
        grams.append(g)
        with torch.no_grad():
            floors.append(mean.square().sum((1, 2)).mul_(CONSTANT_REL * n))
        caps.append(min(n - 1, d))
    groups = []
    for _key, gs in plan.size_groups:
        gram = grams[gs[0]] if len(gs) == 1 else torch.cat([grams[g] for g in gs])
        floor = floors[gs[0]] if len(gs) == 1 else torch.cat([floors[g] for g in gs])
        cap = [caps[g] for g in gs for _ in plan.shape_groups[g][0]]
        groups.append((gram, floor, cap))
    return plan, groups


def _spectrum_entropy_batch(lam: Tensor, floor: Tensor, with_grad: bool):
    """Eq. 2-3 on ascending eigenvalues [k, m] → (H [k], valid [k], dH/dλ [k, m] or None).

    dH/dλ_j = −(log p_j + H)/S on kept eigenvalues and 0 on structural zeros (below rel_zero·λ_max). A layer whose
    spectrum sums to at most ``floor`` is constant (P7): H = 0, zero gradient, valid False. No NaN anywhere."""
    lam = lam.clamp(min=0)
    keep = lam > rel_zero(lam.dtype) * lam[:, -1:]  # ascending: the last one is λ_max
    lam = lam * keep
    s = lam.sum(-1, keepdim=True)
    valid = s[:, 0] > floor
    s = s.clamp(min=torch.finfo(lam.dtype).tiny)
    p = lam / s
    logp = torch.log(p + ~keep)  # log 1 = 0 on the dropped entries: p·log p finite with a finite gradient (P3)
    h = -(p * logp).sum(-1) * valid
    grad = (logp + h[:, None]).div_(s).neg_().mul_(keep & valid[:, None]) if with_grad else None
    return h, valid, grad


# ---- the batched eigensolver: torch (reference, CPU) or CuPy's batched cuSOLVER (CUDA) ------------------------

_CUPY: list = []      # [module or None], resolved once
_BACKEND_SAID = False


def _cupy():
    """CuPy if it imports and sees a GPU (the optional ``regbench[cuda]`` extra), else None. Resolved once."""
    if not _CUPY:
        try:
            import cupy  # noqa: PLC0415 (optional dependency, CUDA only)
            cupy.cuda.runtime.getDeviceCount()
            _CUPY.append(cupy)
        except Exception:  # not installed, no driver, wrong CUDA major: torch's solver is the fallback
            _CUPY.append(None)
    return _CUPY[0]


def eigh_backend(device) -> str:
    """The eigensolver the exact path uses on ``device``: "cupy" on CUDA when CuPy is available, else "torch".

    Why (docs/gpu.md §3; measured by benchmarks/ses_penalty.py): ``torch.linalg.eigh`` on CUDA loops
    one matrix at a time for 32 < n ≤ 512 in float32 (docs/gpu.md §3 has the timing) and synchronizes with the
    host; CuPy's ``linalg.eigh`` on 3-D input calls cuSOLVER's batched Jacobi solver with no size gate and checks
    its info flag only when asked to (no host sync). A matmul-only Chebyshev polynomial of u·log u was rejected: on
    a spectrum with one dominant eigenvalue its |ΔH| is 5e-2 at degree 64 and still 2-4e-4 at degree 512 (the
    criterion is 1e-4). On CUDA without CuPy: torch, with one warning per process."""
    global _BACKEND_SAID
    if torch.device(device).type != "cuda":
        return "torch"
    if _cupy() is not None:
        return "cupy"
    if not _BACKEND_SAID:
        _BACKEND_SAID = True
        import warnings  # noqa: PLC0415
        warnings.warn("CuPy is not installed (pip install 'regbench[cuda]'): exact SES uses torch.linalg.eigh on "
                      "CUDA, which solves one matrix at a time and synchronizes every step (said once)")
    return "torch"


def exact_precision(device) -> torch.dtype:
    """The exact path's working precision for float32/bf16 activations on ``device``: float64 on CUDA (cheap for
    ≤ 512² Grams there, and needed for the 1e-3 gradient criterion, see ``entropies``), float32 on the CPU."""
    return torch.float64 if torch.device(device).type == "cuda" else torch.float32


def batched_eigh(gram: Tensor, vectors: bool = True) -> tuple[Tensor, Tensor | None]:
    """Ascending eigenvalues (and eigenvectors when ``vectors``) of a batch of symmetric [k, m, m] matrices, on the
    backend ``eigh_backend`` picks for their device. CuPy runs on torch's current stream, zero-copy via DLPack."""
    if eigh_backend(gram.device) == "cupy":
        cp = _cupy()
        with cp.cuda.Device(gram.device.index), \
                cp.cuda.ExternalStream(torch.cuda.current_stream(gram.device).cuda_stream):
            w, v = cp.linalg.eigh(cp.from_dlpack(gram.contiguous()))
            lam, vecs = torch.from_dlpack(w), torch.from_dlpack(v)
        return lam, vecs if vectors else None
    if vectors:
        return torch.linalg.eigh(gram)
    return torch.linalg.eigvalsh(gram), None


class _GramEntropy(torch.autograd.Function):
    """Eq. 2-3 on a batch of PSD Grams [k, m, m] → (H [k], valid [k]); one eigh, closed-form backward
    dH/dG = V diag(dH/dλ) Vᵀ (P1: no eigenvector gradient, finite at repeated eigenvalues)."""

    @staticmethod
    def forward(ctx, gram, floor):
        lam, vecs = batched_eigh(gram, ctx.needs_input_grad[0])
        h, valid, grad = _spectrum_entropy_batch(lam, floor, vecs is not None)
        if vecs is not None:
            ctx.save_for_backward(vecs, grad)
        ctx.mark_non_differentiable(valid)
        return h, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, _grad_valid):
        vecs, g = ctx.saved_tensors
        w = g * grad_h[:, None]
        return (vecs * w[:, None, :]) @ vecs.mT, None


class _ExactEntropies(torch.autograd.Function):
    """The whole exact path as ONE autograd node: mats → (H [L], valid [L]) in input order.

    Forward, per group of equal shape: stack, centre, min-side Gram; per group of equal size: one eigh and the
    entropy. Backward: dG = V diag(w) Vᵀ, then dX = 2·X_c·dG (covariance side; centring needs no correction since
    1ᵀX_c = 0) or 2·(J dG)·X_c (Gram side, J the centring projector). Autograd through the same ops gives the same
    gradient with ~8 more nodes and two extra full-size passes per layer."""

    @staticmethod
    def forward(ctx, plan, wide, *mats):
        need = any(ctx.needs_input_grad[2:])
        hs, valids, saved = [], [], []
        for _key, gs in plan.size_groups:
            grams, floors, parts = [], [], []
            for g in gs:
                idx, n, _d, rows = plan.shape_groups[g]
                x = mats[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([mats[i] for i in idx])
                if x.dtype != torch.float64:
                    x = x.double() if wide else x.float()
                mean = x.mean(dim=1, keepdim=True)
                xc = x - mean
                gram = xc @ xc.mT if rows else xc.mT @ xc
                grams.append(gram)
                floors.append(mean.square().sum((1, 2)).mul_(CONSTANT_REL * n))  # P7: vs the raw energy
                parts.append((idx, rows, xc if need else None))
            gram = grams[0] if len(grams) == 1 else torch.cat(grams)
            floor = floors[0] if len(floors) == 1 else torch.cat(floors)
            lam, vecs = batched_eigh(gram, need)
            h, valid, grad = _spectrum_entropy_batch(lam, floor, need)
            hs.append(h)
            valids.append(valid)
            saved.append((parts, vecs, grad))
        # H in the inputs' precision (float64 only for float64 input), whatever precision it was computed in
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
        h = hs[0].to(dtype) if len(hs) == 1 else torch.cat([h.to(dtype) for h in hs])
        valid = valids[0] if len(valids) == 1 else torch.cat(valids)
        if not plan.identity:
            inv = plan.inverse(h.device)
            h, valid = h[inv], valid[inv]
        ctx.plan, ctx.saved, ctx.dtypes = plan, saved, [m.dtype for m in mats]
        ctx.mark_non_differentiable(valid)
        return h, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, _grad_valid):
        plan = ctx.plan
        if not plan.identity:
            grad_h = grad_h[plan.order(grad_h.device)]
        grads: list[Tensor | None] = [None] * len(ctx.dtypes)
        offset = 0
        for parts, vecs, g in ctx.saved:
            k = vecs.shape[0]
            w = g * grad_h[offset:offset + k, None].to(g.dtype)
            offset += k
            dgram = (vecs * w[:, None, :]) @ vecs.mT
            start = 0
            for idx, rows, xc in parts:
                dg = dgram[start:start + len(idx)]
                start += len(idx)
                if rows:  # J·dG, the centring projector on the small side (a no-op up to rounding: 1 ⊥ kept vectors)
                    dg = dg - dg.mean(dim=1, keepdim=True)
                    dx = 2 * (dg @ xc)
                else:
                    dx = 2 * (xc @ dg)
                for j, i in enumerate(idx):
                    grads[i] = dx[j].to(ctx.dtypes[i])
        return (None, None, *grads)


def _entropy_of_parts(top: Tensor, tail: Tensor, tail_dims: Tensor, s: Tensor) -> Tensor:
    """Entropy of a spectrum made of ``top`` [k, r] values plus ``tail_dims`` equal values summing to ``tail``."""
    p = top / s[:, None]
    h = -(p * torch.log(torch.where(p > 0, p, 1))).sum(-1)
    pt = tail / s
    has_tail = (pt > 0) & (tail_dims > 0)
    per = torch.where(has_tail, pt / tail_dims.clamp(min=1), 1)
    return h - torch.where(has_tail, pt * torch.log(per), 0)


def _lowrank_entropy(gram, floor, cap, rank: int, oversample: int, niter: int, generator) -> tuple[Tensor, Tensor]:
    k, m, _ = gram.shape
    q = rank + oversample
    if m <= q:
        return _GramEntropy.apply(gram, floor)
    with torch.no_grad():
        y = gram @ torch.randn(k, m, q, generator=generator, device=gram.device, dtype=gram.dtype)
        for _ in range(niter):
            y = gram @ torch.linalg.qr(y).Q
        basis = torch.linalg.qr(y).Q
    ritz = torch.linalg.eigvalsh(basis.mT @ gram @ basis)[:, -rank:].clamp(min=0)  # ascending: top `rank`
    ritz = torch.where(ritz > rel_zero(ritz.dtype) * ritz[:, -1:].detach(), ritz, 0)
    s = gram.diagonal(dim1=1, dim2=2).sum(-1)
    valid = s.detach() > floor
    s = torch.where(valid, s, 1)
    tail = (s - ritz.sum(-1)).clamp(min=0)
    tail_dims = torch.tensor(cap, device=gram.device, dtype=gram.dtype) - rank
    h = _entropy_of_parts(ritz, tail, tail_dims, s)
    return torch.where(valid, h, 0), valid


_CHEB: dict[tuple, tuple[Tensor, Tensor]] = {}


def _xlogx_chebyshev(degree: int, device=None, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Chebyshev interpolant of f(u) = u log u on u ∈ [0, 1] (x = 2u − 1 ∈ [−1, 1]): (coefficients, its value at
    u = 0, which is not exactly f(0) = 0), cached per degree, device and dtype."""
    key = (degree, str(device), dtype)
    if key not in _CHEB:
        def f(x):
            u = (x + 1) / 2
            return np.where(u > 0, u * np.log(np.where(u > 0, u, 1)), 0.0)
        coef = np.polynomial.chebyshev.chebinterpolate(f, degree)
        at_zero = np.polynomial.chebyshev.chebval(-1.0, coef)
        _CHEB[key] = (torch.tensor(coef, device=device, dtype=dtype), torch.tensor(at_zero, device=device, dtype=dtype))
    return _CHEB[key]


def _hutchinson_entropy(gram, floor, cap, probes: int, degree: int, generator) -> tuple[Tensor, Tensor]:
    k, m, _ = gram.shape
    dev, dt = gram.device, gram.dtype
    s = gram.diagonal(dim1=1, dim2=2).sum(-1)
    valid = s.detach() > floor
    s = torch.where(valid, s, 1)
    with torch.no_grad():  # ℓ ≥ λ_max: power iteration (from below) with a margin, never above the trace
        v = torch.randn(k, m, 1, generator=generator, device=dev, dtype=dt)
        for _ in range(8):
            v = gram @ v
            v = v / v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
        ell = torch.minimum(1.25 * (v.mT @ gram @ v).reshape(k), s.detach())
        ell = torch.where(valid, ell, 1)
    coef, p0 = _xlogx_chebyshev(degree, dev, dt)
    z = (torch.randint(0, 2, (k, m, probes), generator=generator, device=dev) * 2 - 1).to(dt)
    a = gram * (2 / ell)[:, None, None]  # x = 2u − 1 = (2/ℓ)C − I
    w_prev, w = z, a @ z - z
    acc = coef[0] * (z * z).sum((1, 2)) + coef[1] * (z * w).sum((1, 2))
    for j in range(2, degree + 1):
        w_prev, w = w, 2 * (a @ w - w) - w_prev
        acc = acc + coef[j] * (z * w).sum((1, 2))
    tr = acc / probes
    zeros = m - torch.tensor(cap, device=dev, dtype=dt)  # structural zeros: f(0) = 0, but the polynomial gives p0
    tr = tr - zeros * p0
    ratio = ell / s
    h = -(ratio * tr + torch.log(ratio))
    return torch.where(valid, h, 0), valid


def entropies(mats: Sequence[Tensor], path: str = "exact", *, side: str = "min", rank: int = 32, oversample: int = 8,
              niter: int = 2, probes: int = 16, degree: int = 32, generator: torch.Generator | None = None,
              wide: bool | None = None):
    """Spectral entropy (eq. 3) of every [n, d] matrix in ``mats`` → (H [L], valid [L] bool), in input order.

    ``valid`` is False for a layer constant over the batch (P7): its H is 0 with no gradient. Differentiable.
    ``path``: "exact" | "lowrank" | "hutchinson" (see the module docstring for the estimators and their bias).
    ``wide`` (exact path, float32/bf16 input): centre, multiply and eigensolve in float64. Default (None): on CUDA
    only (``exact_precision``), where it is what meets |ΔH| ≤ 1e-4 and gradients within 1e-3 relative on adversarial
    spectra (one dominant eigenvalue: a float32 Gram's absolute error eps·λ_max is a 1e-2 relative gradient error);
    on the CPU float32 stays the default (half the cost; |ΔH| ≤ 1e-4 on the same spectra, gradients not).
    """
    if path not in PATHS:
        raise ValueError(f"unknown spectral path {path!r}; use one of {', '.join(PATHS)}")
    if not mats:
        raise ValueError("entropies() needs at least one matrix")
    for x in mats:
        if x.dim() != 2:
            raise ValueError(f"entropies expects [n, d] matrices, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=mats[0].device.type, enabled=False):
        if path == "exact":
            if wide is None:
                wide = exact_precision(mats[0].device) == torch.float64
            return _ExactEntropies.apply(_plan(mats, side), wide, *mats)
        plan, groups = min_side_grams(mats, side)
        hs, vs = [], []
        for gram, floor, cap in groups:
            if path == "lowrank":
                h, v = _lowrank_entropy(gram, floor, cap, rank, oversample, niter, generator)
            else:
                h, v = _hutchinson_entropy(gram, floor, cap, probes, degree, generator)
            hs.append(h)
            vs.append(v)
        if len(hs) > 1:
            dtype = torch.float64 if any(h.dtype == torch.float64 for h in hs) else hs[0].dtype
            h, valid = torch.cat([h.to(dtype) for h in hs]), torch.cat(vs)
        else:
            h, valid = hs[0], vs[0]
        if not plan.identity:
            inv = plan.inverse(h.device)
            h, valid = h[inv], valid[inv]
    return h, valid

