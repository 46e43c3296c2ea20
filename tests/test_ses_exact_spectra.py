"""Issue 18 item 1: the exact SES path (float32, the device's eigensolver backend) against float64 eigh on
adversarial spectra and on real activations: |ΔH| ≤ 1e-4 per layer, gradients within 1e-3 relative.

The reference is independent of regbench.spectral: numpy/torch float64 eigvalsh of the d×d covariance (eq. 1-3),
its gradient by autograd. On CUDA (when the device switch says cuda) the same checks run on the GPU backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from regbench.spectral import eigh_backend, entropies, exact_precision
from regbench.suites import cifar_subset

SUBSET = cifar_subset.SUBSET  # $REGBENCH_CIFAR10_SUBSET, which tests/conftest.py always sets
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(x64: torch.Tensor):
    """Eq. 3 in float64 on the d×d covariance, and dH/dX by autograd (NaN-safe p·log p, 1e-12 relative zero)."""
    x = x64.clone().requires_grad_(True)
    xc = x - x.mean(0, keepdim=True)
    lam = torch.linalg.eigvalsh(xc.T @ xc).clamp(min=0)
    lam = torch.where(lam > 1e-12 * lam.max().detach(), lam, torch.zeros_like(lam))
    p = lam / lam.sum()
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    h.backward()
    return h.item(), x.grad


def _spectra(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(256, d, generator=g, dtype=torch.float64)
    relu = torch.relu(gauss @ torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
    dead = relu * (torch.rand(d, generator=g, dtype=torch.float64) > 0.5)  # half the units never fire
    scale_dom = torch.ones(d, dtype=torch.float64)
    scale_dom[0] = 1e3
    scale_zero = torch.ones(d, dtype=torch.float64)
    scale_zero[d // 2:] = 1e-3  # a cluster of eigenvalues at 1e-6·λ_max
    return {
        "rank_deficient_B<d": torch.randn(48, d, generator=g, dtype=torch.float64),
        "dead_relu": dead,
        "one_dominant": gauss * scale_dom,
        "cluster_near_zero": relu * scale_zero,
    }


def _check(x64: torch.Tensor, device: str, wide: bool | None = True, grads: bool = True):
    """float32 activations in, the exact path (float64 working precision when ``wide``, the CUDA default)."""
    h_ref, g_ref = _reference(x64)
    x = x64.float().to(device).requires_grad_(True)
    h, valid = entropies([x], "exact", wide=wide)
    assert bool(valid[0]) and h.dtype == torch.float32
    h.sum().backward()
    assert abs(h.item() - h_ref) <= 1e-4
    g = x.grad.double().cpu()
    if grads:
        assert torch.linalg.vector_norm(g - g_ref) <= 1e-3 * torch.linalg.vector_norm(g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 512])
def test_exact_path_matches_float64_on_adversarial_spectra(device, d):
    for name, x in _spectra(d).items():
        try:
            _check(x, device)
        except AssertionError as exc:
            raise AssertionError(f"{name}, d={d}, backend {eigh_backend(device)}") from exc


def test_cuda_works_in_float64_and_cpu_float32_keeps_the_value_criterion():
    """The per-device default: float64 working precision on CUDA; the CPU's float32 default meets |ΔH| ≤ 1e-4 on
    every adversarial spectrum (its gradient does not on one dominant eigenvalue: ~1e-2, hence float64 on CUDA)."""
    assert exact_precision("cuda") == torch.float64 and exact_precision("cpu") == torch.float32
    for name, x in _spectra(512).items():
        try:
            _check(x, "cpu", wide=None, grads=False)
        except AssertionError as exc:
            raise AssertionError(f"{name}, float32") from exc


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_constant_over_the_batch_is_invalid_with_zero_gradient(device):
    x = torch.full((64, 32), 0.7, device=device).requires_grad_(True)
    y = torch.randn(64, 32, device=device)
    h, valid = entropies([x, y], "exact")
    assert valid.tolist() == [False, True] and h[0].item() == 0
    h.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.skipif(not SUBSET.exists(), reason="shared cifar10_subset not present")
@pytest.mark.parametrize("device", DEVICES)
def test_exact_path_matches_float64_on_real_activations(device):
    """Post-ReLU features of real CIFAR-10 images through a random conv layer, GAP'd (d = 64) and flattened
    patches (d = 192): the spectra trained and untrained nets actually produce."""
    images = np.load(SUBSET)["x_train"][:256]
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 255
    conv = torch.nn.Conv2d(3, 64, 3, padding=1).double()
    torch.manual_seed(0)
    with torch.no_grad():
        gap = torch.relu(conv(x)).mean((2, 3))
        patches = x[:, :, :8, :8].reshape(256, -1)
    _check(gap, device)
    _check(patches, device)


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
def test_cuda_backend_is_the_batched_solver_when_cupy_is_installed():
    pytest.importorskip("cupy")
    assert eigh_backend("cuda") == "cupy"
    assert eigh_backend("cpu") == "torch"


@pytest.mark.parametrize("side", ["cov", "gram"])
def test_exact_zero_rows_of_batched_grams_match_float64_eigh(side):
    """Exactly zero rows of a Gram (dead units on the d×d side, samples equal to the batch mean on the B×B side),
    with different counts in one batched eigensolve: each layer still matches float64, value and gradient."""
    g = torch.Generator().manual_seed(7)
    n, d = (200, 40) if side == "cov" else (30, 64)
    layers = []
    for dead in (2, 5, 17):
        if side == "cov":
            x = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3)
            x[:, torch.randperm(d, generator=g)[:dead]] = 0.0  # never fires
        else:  # small integers, rows in ± pairs around c: the float32 mean is exactly c, so rows equal to c are
            c = torch.randint(0, 5, (d,), generator=g).double()  # exact zero rows of the centred B×B Gram
            v = torch.randint(-4, 5, ((n - dead) // 2, d), generator=g).double()
            x = torch.cat([c.expand(dead + (n - dead) % 2, d), c + v, c - v])
        layers.append(x)
    xs = [x.float().requires_grad_(True) for x in layers]
    h, valid = entropies(xs, "exact")
    h.sum().backward()
    assert valid.all()
    for x64, hi, x in zip(layers, h, xs):
        h_ref, g_ref = _reference(x64)
        assert abs(hi.item() - h_ref) <= 1e-5
        assert torch.linalg.vector_norm(x.grad.double() - g_ref) <= 1e-3 * torch.linalg.vector_norm(g_ref)
