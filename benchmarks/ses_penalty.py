"""The SES penalty alone, per eigen path and device (issue 18): 9 hooks at the paper's shapes (ResNet-18, GAP:
d = 64, 64, 128, 128, 256, 256, 512, 512, 512; B = 256), forward + backward, ms per call (median), and each path's
worst |ΔH| per layer against float64 eigh of the d×d covariance (eq. 1-3).

It also prints the measurement behind the CUDA design choice (docs/gpu.md §3 option 2, rejected): the error of a
degree-q Chebyshev interpolant of u·log u applied to the spectrum (what a matmul-only polynomial of the Gram gives in
exact arithmetic, structural zeros corrected by the known rank) on adversarial spectra at d = 64..512.

    python benchmarks/ses_penalty.py [--device cpu|cuda] [--repeats 20] [--batch 256] [--no-poly]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from regbench.spectral import eigh_backend, entropies

WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512, 512)


def activations(batch: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Post-ReLU-like [B, d] features with a decaying spectrum, one per hook."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for d in WIDTHS:
        mix = torch.randn(d, d, generator=g) * torch.arange(1, d + 1).pow(-0.7)
        mats.append(torch.relu(torch.randn(batch, d, generator=g) @ mix).to(device))
    return mats


def reference(mats) -> np.ndarray:
    out = []
    for x in mats:
        x = x.detach().double().cpu().numpy()
        xc = x - x.mean(0)
        lam = np.clip(np.linalg.eigvalsh(xc.T @ xc), 0, None)
        p = lam[lam > 1e-12 * lam.max()] / lam.sum()
        out.append(-(p * np.log(p)).sum())
    return np.array(out)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_path(mats, device: str, repeats: int, **kw) -> tuple[float, float]:
    """(median ms of forward + backward, the entropies of the last call)."""
    times, h = [], None
    for i in range(repeats + 2):
        xs = [m.detach().requires_grad_(True) for m in mats]
        sync(device)
        t0 = time.perf_counter()
        h, _valid = entropies(xs, **kw)
        h.square().sum().backward()
        sync(device)
        if i >= 2:  # two warm-up calls (plans, kernels, CuPy handles)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), h.detach().double().cpu().numpy()


def poly_table() -> None:
    cheb = np.polynomial.chebyshev
    rng = np.random.default_rng(0)
    print("\nChebyshev u·log u on the spectrum (matmul-only design), max over layers of |ΔH| vs float64 eigh, B = 256")
    degrees = (64, 128, 256, 512)
    coefs = {q: cheb.chebinterpolate(lambda x: np.where(x > -1, (x + 1) / 2 * np.log(np.maximum((x + 1) / 2, 1e-300)),
                                                         0.0), q) for q in degrees}
    print(f"{'spectrum':<18} {'d':>4} " + " ".join(f"{'q=' + str(q):>9}" for q in degrees))
    for d in (64, 128, 256, 512):
        x = rng.standard_normal((256, d))
        spectra = {"gaussian": x,
                   "dead_relu": np.maximum(x @ rng.standard_normal((d, d)) / d ** 0.5, 0) * (rng.random(d) > 0.5),
                   "one_dominant": x * np.r_[1e3, np.ones(d - 1)],
                   "cluster_near_zero": x * np.r_[np.ones(d // 2), 1e-3 * np.ones(d - d // 2)],
                   "power_law": x * np.arange(1, d + 1) ** -1.0}
        for name, h in spectra.items():
            hc = h - h.mean(0)
            gram = hc @ hc.T if 256 < d else hc.T @ hc
            lam = np.clip(np.linalg.eigvalsh(gram), 0, None)
            s, ell, m, r = lam.sum(), lam.max(), len(lam), min(255, d)
            p = lam[lam > 1e-15 * ell] / s
            exact = -(p * np.log(p)).sum()
            errs = []
            for q in degrees:
                tr = cheb.chebval(2 * lam / ell - 1, coefs[q]).sum() - (m - r) * cheb.chebval(-1.0, coefs[q])
                errs.append(abs(-(ell / s) * tr - np.log(ell / s) - exact))
            print(f"{name:<18} {d:>4} " + " ".join(f"{e:>9.1e}" for e in errs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-poly", action="store_true", help="skip the polynomial-accuracy table")
    args = parser.parse_args()
    mats = activations(args.batch, args.device)
    ref = reference(mats)
    print(f"SES penalty alone: 9 hooks, B = {args.batch}, forward + backward, device {args.device} "
          f"(exact eigensolver: {eigh_backend(args.device)}), torch {torch.__version__}")
    print(f"{'path':<28} {'ms/call':>9} {'max |ΔH| vs fp64':>17}")
    runs = [("exact (float64 Gram, default)", dict(path="exact")),
            ("exact float32 Gram", dict(path="exact", wide=False)),
            ("lowrank rank 32", dict(path="lowrank", generator=torch.Generator(args.device).manual_seed(0))),
            ("hutchinson 16 probes, q 32", dict(path="hutchinson",
                                                 generator=torch.Generator(args.device).manual_seed(0)))]
    for label, kw in runs:
        ms, h = time_path(mats, args.device, args.repeats, **kw)
        print(f"{label:<28} {ms:>9.2f} {np.abs(h - ref).max():>17.1e}")
    if not args.no_poly:
        poly_table()


if __name__ == "__main__":
    main()
