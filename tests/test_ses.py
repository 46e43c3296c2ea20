"""SES (seed 000, eq. 1-6): spectral_entropy against closed forms and numpy, gradients, the regularizer value."""
import math

import numpy as np
import pytest
import torch
from helpers import attached
from regbench.methods.base import StepContext
from regbench.methods.ses import SES, as_matrix, spectral_entropy

from regbench.errors import HparamError
from regbench.spectral import entropies


def numpy_entropy(h: np.ndarray) -> float:
    """Eq. 1-3 literally: covariance, eigenvalues, normalised spectrum, Shannon entropy."""
    x = h - h.mean(axis=0, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(x.T @ x / (len(h) - 1)), 0, None)
    p = lam / lam.sum()
    p = p[p > 1e-12]
    return float(-(p * np.log(p)).sum())


def isotropic(d: int, scale: float = 3.0) -> torch.Tensor:
    # Rows ±scale·e_i: zero mean and covariance exactly proportional to the identity.
    eye = torch.eye(d, dtype=torch.float64) * scale
    return torch.cat([eye, -eye])


@pytest.mark.parametrize("d", [2, 7, 64])
def test_isotropic_data_has_entropy_log_d(d):
    assert spectral_entropy(isotropic(d)).item() == pytest.approx(math.log(d), abs=1e-10)


def test_rank_one_data_has_entropy_zero():
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    assert spectral_entropy(u @ v).item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("n,d", [(64, 16), (16, 64), (33, 33)])
def test_matches_numpy_on_both_gram_paths(n, d):
    h = torch.relu(torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64))
    assert spectral_entropy(h).item() == pytest.approx(numpy_entropy(h.numpy()), abs=1e-9)


def test_float32_is_close_to_float64():
    h = torch.randn(128, 48, dtype=torch.float64)
    assert spectral_entropy(h.float()).item() == pytest.approx(spectral_entropy(h).item(), abs=1e-5)


@pytest.mark.parametrize("h", [isotropic(8), torch.cat([isotropic(4), torch.zeros(8, 12, dtype=torch.float64)], 1),
                               torch.randn(6, 40, dtype=torch.float64)], ids=["repeated", "exact-zeros", "d>n"])
def test_gradient_is_finite_with_repeated_or_zero_eigenvalues(h):
    h = h.clone().requires_grad_(True)
    spectral_entropy(h).backward()
    assert torch.isfinite(h.grad).all()


def test_gradient_matches_finite_differences():
    h = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spectral_entropy, (h,), eps=1e-6, atol=1e-5)


def test_entropy_is_scale_invariant_and_rejects_non_matrices():
    h = torch.randn(30, 10, dtype=torch.float64)
    assert spectral_entropy(7.5 * h).item() == pytest.approx(spectral_entropy(h).item(), abs=1e-10)
    with pytest.raises(ValueError):
        spectral_entropy(torch.randn(2, 3, 4))


def test_conv_maps_reduce_to_channels():
    a = torch.randn(4, 6, 5, 5)
    assert as_matrix(a, "gap").shape == (4, 6)
    assert torch.allclose(as_matrix(a, "gap"), a.mean(dim=(2, 3)))
    assert as_matrix(a, "positions").shape == (4 * 25, 6)
    assert as_matrix(torch.randn(4, 6, 1, 1)).shape == (4, 6)


def test_regularizer_value_is_eq5_times_lambda():
    """R = Σ_l (H_l − β log d_l)², loss = λ R (eq. 5-6), on the two hidden layers of a real MLP, attached for real,
    fed activations whose entropies are known (log 4 and log 9)."""
    method = SES({"lam": 0.5, "beta": 0.5})
    keys = attached(method, "mlp")
    assert keys == ["act1", "act2"]
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1": isotropic(4), "act2": isotropic(9)})
    expected = 0.5 * ((math.log(4) - 0.5 * math.log(4)) ** 2 + (math.log(9) - 0.5 * math.log(9)) ** 2)
    assert method.loss(step).item() == pytest.approx(expected, abs=1e-10)
    method.after_step(step)
    assert method.diagnostics()["ses_entropy/act2"] == pytest.approx(math.log(9), abs=1e-10)


def test_pooled_layer_rule_hooks_only_the_last_feature_layer():
    assert attached(SES({"layers": "pool"}), "cnn1d") == ["act_fc"]


def test_unreachable_target_is_clipped_to_the_rank_cap_and_said_once(monkeypatch):
    import warnings

    from regbench.methods import ses as ses_module

    monkeypatch.setattr(ses_module, "_CLIP_SAID", False)
    method = SES({"beta": 0.9})
    attached(method, "mlp")
    few = {"act1": torch.randn(8, 256, dtype=torch.float64), "act2": torch.randn(8, 256, dtype=torch.float64)}
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None, activations=few)
    with pytest.warns(ses_module.SESTargetClipped, match="clipped"):
        loss = method.loss(step)
    # 256^0.9 ≈ 147 > the 7 a batch of 8 allows: the target is log 7, so the penalty is Σ_l (H_l − log 7)².
    h = torch.stack([spectral_entropy(few[k]) for k in ("act1", "act2")])
    assert float(loss) == pytest.approx(0.01 * float(((h - math.log(7)) ** 2).sum()), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process: another run (a new instance) says nothing
        second = SES({"beta": 0.8})
        attached(second, "mlp")
        second.loss(step)


def test_constant_layer_is_skipped_not_nan():
    method = SES()
    attached(method, "mlp")
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1": torch.zeros(16, 8), "act2": torch.zeros(16, 8)})
    assert method.loss(step) is None


@pytest.mark.parametrize("bad", [{"beta": 0}, {"beta": 1}, {"beta": 1.5}, {"lam": -0.1}, {"conv_reduce": "flat"},
                                 {"gamma": 1}])
def test_invalid_hparams_are_rejected(bad):
    with pytest.raises(HparamError):
        SES(bad)


def test_string_overrides_are_typed_like_defaults():
    assert SES({"beta": "0.6", "lam": "1e-3"}).hparams["beta"] == 0.6
    with pytest.raises(HparamError):
        SES({"beta": "high"})


# ---- the batched fast path (regbench.spectral.entropies) and the new hparams ------------------------------------

def numpy_eq3(h: np.ndarray) -> float:
    """Eq. 1-3 with no threshold at all (only exact float64 zeros removed): the definition, not an implementation."""
    x = h - h.mean(axis=0, keepdims=True)
    lam = np.linalg.eigvalsh(x.T @ x / (len(h) - 1))
    lam = lam[lam > 1e-13 * lam.max()]  # float64 rounding of the d − rank structural zeros
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum())


def with_spectrum(n: int, d: int, sv: np.ndarray, seed: int = 0) -> torch.Tensor:
    """[n, d] with zero column means and singular values sv: eigenvalues spanning many decades (real ResNet layer1
    features have some at 1e-7…1e-5·λ_max, where a 1e-6 threshold would move H by ~2e-5)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, len(sv))) - rng.standard_normal((1, len(sv))))[0]
    u -= u.mean(axis=0, keepdims=True)
    u = np.linalg.qr(u)[0]
    v = np.linalg.qr(rng.standard_normal((d, len(sv))))[0]
    return torch.from_numpy((u * sv) @ v.T + rng.standard_normal((1, d)))


SHAPES = [(64, 16), (16, 64), (33, 33), (64, 16), (40, 16), (12, 100)]


def relu_features(shapes=SHAPES, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(n, d, generator=g, dtype=dtype) @ torch.randn(d, d, generator=g, dtype=dtype))
            for n, d in shapes]


@pytest.mark.parametrize("side", ["min", "cov", "gram"])
def test_batched_entropies_equal_numpy_eq3_on_every_eigen_path(side):
    """Covariance side (d×d), Gram side (n×n) and the min-side rule: all equal eq. 3 computed by numpy."""
    mats = relu_features() + [with_spectrum(50, 30, np.logspace(0, -4.5, 20)),
                              with_spectrum(20, 90, np.logspace(0, -4, 19))]
    h, valid = entropies(mats, side=side)
    assert valid.all()
    for hi, m in zip(h.tolist(), mats):
        assert hi == pytest.approx(numpy_eq3(m.numpy()), abs=1e-9)


def test_the_two_eigen_paths_agree_and_float32_is_within_1e_6_of_eq3():
    mats = relu_features() + [with_spectrum(64, 48, np.logspace(0, -4, 40)),
                              with_spectrum(32, 96, np.logspace(0, -3.5, 31))]
    h_cov, _ = entropies(mats, side="cov")
    h_gram, _ = entropies(mats, side="gram")
    assert torch.allclose(h_cov, h_gram, rtol=0, atol=1e-11)
    h32, _ = entropies([m.float() for m in mats])
    assert h32.dtype == torch.float32
    ref = torch.tensor([numpy_eq3(m.numpy()) for m in mats], dtype=torch.float64)
    assert (h32.double() - ref).abs().max() < 1e-6


def test_batched_gradient_equals_autograd_through_eigvalsh():
    """The one-node closed-form backward (dX = 2 X_c V diag(dH/dλ) Vᵀ, centring projector on the Gram side) gives
    autograd's gradient of the single-matrix reference, for layers of mixed shapes grouped out of input order."""
    mats = [m.requires_grad_() for m in relu_features()]
    weights = torch.arange(1.0, len(mats) + 1, dtype=torch.float64)
    h, _ = entropies(mats)
    got = torch.autograd.grad(((h - 1.5) ** 2 * weights).sum(), mats)
    ref = torch.stack([spectral_entropy(m) for m in mats])
    want = torch.autograd.grad(((ref - 1.5) ** 2 * weights).sum(), mats)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


def test_batched_gradient_matches_finite_differences():
    x = [torch.randn(7, 4, dtype=torch.float64, requires_grad=True), torch.randn(4, 9, dtype=torch.float64,
                                                                                  requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: entropies([a, b])[0], tuple(x), eps=1e-6, atol=1e-5)


def test_one_eigensolve_per_matrix_size():
    """Nine layers with three distinct min(n, d) (the paper's 9 hooks at B = 256: 64, 128, 256) → three calls."""
    from torch.profiler import ProfilerActivity, profile
    shapes = [(256, 64)] * 2 + [(256, 128)] * 2 + [(256, 256)] * 2 + [(256, 512)] * 3
    mats = [m.float().requires_grad_() for m in relu_features(shapes, seed=1)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        h, _ = entropies(mats)
        h.sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_eigh")
    assert calls == 3


def test_autocast_bf16_activations_are_computed_in_float32():
    x = relu_features([(64, 32)])[0].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = entropies([x.bfloat16()])
    assert h.dtype == torch.float32
    assert h.item() == pytest.approx(entropies([x.bfloat16().float()])[0].item(), abs=1e-6)


def test_constant_layers_are_flagged_and_get_no_nan():
    live = relu_features([(16, 8)])[0].requires_grad_()
    dead, const = torch.zeros(16, 8, requires_grad=True), torch.full((16, 8), 3.3, requires_grad=True)
    h, valid = entropies([dead, live, const])
    assert valid.tolist() == [False, True, False]
    h.sum().backward()
    assert h[0] == 0 and h[2] == 0 and torch.isfinite(live.grad).all() and not dead.grad.any()


def test_lowrank_is_exact_when_rank_covers_the_spectrum_and_biased_upward_otherwise():
    gen = torch.Generator().manual_seed(0)
    low = with_spectrum(96, 80, np.logspace(0, -1, 6))  # rank 6 < rank=8: Ritz captures it all, tail mass 0
    h_low, _ = entropies([low], "lowrank", rank=8, generator=gen)
    assert h_low.item() == pytest.approx(numpy_eq3(low.numpy()), abs=1e-8)
    small = relu_features([(64, 12)])  # min(n, d) = 12 ≤ rank + oversample (8 + 8): computed exactly
    assert entropies(small, "lowrank", rank=8, generator=gen)[0].item() == pytest.approx(
        numpy_eq3(small[0].numpy()), abs=1e-10)
    full = relu_features([(128, 96), (64, 200), (100, 100)], seed=3)
    h_lr, _ = entropies(full, "lowrank", rank=8, generator=gen)
    h_ex, _ = entropies(full)
    assert (h_lr >= h_ex - 1e-9).all() and (h_lr - h_ex).max() > 1e-3  # max-entropy tail: an upper estimate


def test_hutchinson_closed_form_on_isotropic_data_and_close_on_features():
    """C = c·I: zᵀ p(C/ℓ) z = m·p(c/ℓ) for every Rademacher z, so the estimate is log m up to the polynomial error."""
    gen = torch.Generator().manual_seed(0)
    for d in (8, 48):
        h, _ = entropies([isotropic(d)], "hutchinson", probes=2, degree=32, generator=gen)
        assert h.item() == pytest.approx(math.log(d), abs=1e-4)
    # Gram side: 4 simplex vertices, centred Gram = J (eigenvalues 1, 1, 1 and the structural 0, which the
    # polynomial maps to p(0) ≈ −0.0115 at degree 8: a +4.9e-3 bias unless corrected). Many probes: the null
    # direction is not isotropic for Rademacher vectors (sd of H ≈ 0.09/√probes).
    simplex = torch.cat([torch.eye(4, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)], 1)
    h, _ = entropies([simplex], "hutchinson", probes=65536, degree=8, generator=gen)
    assert h.item() == pytest.approx(math.log(3), abs=1.5e-3)
    mats = relu_features([(128, 64), (64, 128)], seed=2)
    h, _ = entropies(mats, "hutchinson", probes=256, degree=64, generator=gen)
    assert (h - entropies(mats)[0]).abs().max() < 0.05


@pytest.mark.parametrize("path", ["exact", "lowrank", "hutchinson"])
def test_every_path_trains_a_real_cnn_with_finite_gradients(path):
    from regbench import engine, models
    torch.manual_seed(0)
    model = models.create_model("cnn", 10, (1, 8, 8))
    capture = engine.ActivationCapture(model)
    method = SES({"eigen_path": path, "rank": 4, "probes": 4, "degree": 8})
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    for step in range(2):
        _task, reg = engine.train_step(model, method, capture, opt, x, y, step=step)
        assert torch.isfinite(reg) and reg > 0
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    diagnostics = method.diagnostics()
    assert set(diagnostics) == {f"ses_entropy/{k}" for k in method.keys} | {"ses_eigh_cupy"}
    assert diagnostics["ses_eigh_cupy"] == 0.0  # the CPU's solver is torch's, recorded with the run


def test_loss_equals_eq5_on_captured_conv_activations():
    """Through a real forward: the fast path (sum-pooled GAP, batched, float32) against eq. 5 on the mean-pooled
    activations with the float64 single-matrix reference."""
    from regbench import engine, models
    torch.manual_seed(0)
    model = models.create_model("cnn1d", 10, (40,))
    capture = engine.ActivationCapture(model)
    method = SES({"lam": 0.3, "beta": 0.6})
    method.attach(model, engine.ModelContext(model, capture, 10, (40,)))
    capture.active = True
    logits = model(torch.randn(96, 40))
    capture.active = False
    acts = dict(capture.store)
    step = StepContext(inputs=None, targets=None, logits=logits, task_loss=None, activations=acts)
    want = 0.3 * sum((spectral_entropy(as_matrix(acts[k]).double()) - 0.6 * math.log(as_matrix(acts[k]).shape[1])) ** 2
                     for k in method.keys)
    assert method.loss(step).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:ses.beta")
def test_every_k_captures_nothing_and_adds_nothing_on_the_other_steps():
    from regbench import engine, models
    torch.manual_seed(0)
    model = models.create_model("mlp", 10, (1, 40))
    capture = engine.ActivationCapture(model)
    method = SES({"every": 3})
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 40)))
    assert [method.wants_activations(s) for s in range(7)] == [True, False, False, True, False, False, True]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    regs = [float(engine.train_step(model, method, capture, opt, x, y, step=s)[1]) for s in range(6)]
    assert regs[0] > 0 and regs[3] > 0 and regs[1] == regs[2] == regs[4] == regs[5] == 0
    # composed with a method that captures every step, the activations are there on step 1: still no penalty
    acts = {k: torch.randn(32, 256) for k in method.keys}
    assert method.loss(StepContext(None, None, None, None, activations=acts, step=1)) is None


def test_scale_by_k_multiplies_lambda_by_k():
    acts = {"act1": isotropic(4), "act2": isotropic(9)}
    plain, scaled = SES({"every": 4}), SES({"every": 4, "scale_by_k": True})
    attached(plain, "mlp")
    attached(scaled, "mlp")
    step = StepContext(None, None, None, None, activations=acts, step=8)
    assert scaled.loss(step).item() == pytest.approx(4 * plain.loss(step).item(), rel=1e-12)


def test_a_constant_layer_drops_out_of_the_sum():
    method = SES({"lam": 1.0, "beta": 0.5})
    attached(method, "mlp")
    step = StepContext(None, None, None, None, activations={"act1": torch.zeros(16, 4), "act2": isotropic(9)})
    assert method.loss(step).item() == pytest.approx((math.log(9) - 0.5 * math.log(9)) ** 2, abs=1e-10)


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": 1.5}, {"every": True}, {"eigen_path": "svd"}, {"rank": 0},
                                 {"degree": 1}, {"probes": 0}, {"niter": -1}, {"scale_by_k": "maybe"}])
def test_invalid_new_hparams_are_rejected_in_one_line(bad):
    with pytest.raises(HparamError) as err:
        SES(bad)
    assert "\n" not in str(err.value) and f"ses.{next(iter(bad))}" in str(err.value)
