"""DLN entropic prior (seed 001; docs/dln.md): the entropy against the ratio formula of §2.1, its
gradient against §2.3, the equal-singular-value gradient and the weight-decay equilibrium of §5(b), numerical safety,
and the method's loss on real models against sums computed by hand with numpy."""
import itertools
import math

import numpy as np
import optuna
import pytest
import torch

from regbench import engine, models, registry
from regbench.errors import HparamError, RegbenchError
from regbench.methods.dln_entropy import (DLNEntropy, dln_entropy, left_vectors, matrix_entropy, short_side,
                                          singular_values, vector_route)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def ratio_form(sigma, N):
    """½ log(van(σ²)/van(σ^{2/N})) (docs/dln.md §2.1, constant dropped), literally, pair by pair; needs distinct σ."""
    return 0.5 * sum(math.log(abs(a * a - b * b)) - math.log(abs(a ** (2 / N) - b ** (2 / N)))
                     for a, b in itertools.combinations(sigma, 2))


def closed_form_grad(sigma, N):
    """docs/dln.md §2.3: ∂S/∂σ_i = Σ_{j≠i} [σ_i/(σ_i²−σ_j²) − (1/N) σ_i^{2/N−1}/(σ_i^{2/N}−σ_j^{2/N})]."""
    return [sum(si / (si * si - sj * sj) - si ** (2 / N - 1) / N / (si ** (2 / N) - sj ** (2 / N))
                for j, sj in enumerate(sigma) if j != i) for i, si in enumerate(sigma)]


def random_sigma(rng, d):
    return np.exp(rng.uniform(-2.0, 1.5, size=d))  # spans 0.14 … 4.5, distinct with probability one


# ---- the entropy function --------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,N", [(2, 2), (3, 3), (4, 5), (5, 11), (8, 4)])
def test_sum_form_equals_ratio_form(d, N):
    rng = np.random.default_rng(d * 100 + N)
    for _ in range(20):
        sigma = random_sigma(rng, d)
        got = dln_entropy(torch.tensor(sigma), N).item()
        assert got == pytest.approx(ratio_form(sigma, N), abs=1e-10, rel=1e-12)


def test_batched_over_leading_dims():
    rng = np.random.default_rng(0)
    sigma = np.stack([[random_sigma(rng, 4) for _ in range(3)] for _ in range(2)])  # (2, 3, 4)
    got = dln_entropy(torch.tensor(sigma), 6)
    assert got.shape == (2, 3)
    want = [[ratio_form(s, 6) for s in row] for row in sigma]
    assert np.allclose(got.numpy(), want, atol=1e-10)


@pytest.mark.parametrize("d,N", [(2, 2), (3, 7), (5, 4)])
def test_gradient_in_sigma_matches_closed_form(d, N):
    rng = np.random.default_rng(7 * d + N)
    for _ in range(5):
        sigma = random_sigma(rng, d)
        s = torch.tensor(sigma, requires_grad=True)
        dln_entropy(s, N).backward()
        assert np.allclose(s.grad.numpy(), closed_form_grad(sigma, N), rtol=1e-9, atol=1e-12)
        assert (s.grad > 0).all()  # docs/dln.md §2.3: entropy pushes every singular value up


def test_smooth_across_collisions_without_epsilon():
    # σ_1 = σ_2 exactly: P_N(λ, λ) = N λ^{N−1}, so S = ½ (log N + (N−1)(2/N) log σ) for d = 2.
    N, s = 5, 0.7
    value = dln_entropy(torch.tensor([s, s], dtype=torch.float64), N).item()
    assert value == pytest.approx(0.5 * (math.log(N) + (N - 1) * (2 / N) * math.log(s)), abs=1e-14)
    # and a near-collision agrees with the limit
    near = dln_entropy(torch.tensor([s, s * (1 + 1e-9)], dtype=torch.float64), N).item()
    assert near == pytest.approx(value, abs=1e-8)


def test_homogeneity():
    # docs/dln.md §2.3: S_N(tσ) = S_N(σ) + K log t, K = d(d−1)(N−1)/(2N).
    d, N, t = 6, 4, 3.7
    s = torch.tensor(random_sigma(np.random.default_rng(3), d))
    K = d * (d - 1) * (N - 1) / (2 * N)
    assert (dln_entropy(t * s, N) - dln_entropy(s, N)).item() == pytest.approx(K * math.log(t), abs=1e-11)


def test_depth_one_is_zero_and_bad_depth_rejected():
    s = torch.tensor(random_sigma(np.random.default_rng(4), 5))
    assert dln_entropy(s, 1).item() == 0.0
    with pytest.raises(ValueError):
        dln_entropy(s, 0)


# ---- singular values and gradients w.r.t. matrices ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 6), (4, 20), (20, 4), (5, 3), (3, 5), (3, 7, 16)])
def test_singular_values_match_svdvals_value_and_gradient(shape):
    torch.manual_seed(0)
    m = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(*shape[:-2], min(shape[-2:]), dtype=torch.float64)
    mine, ref = singular_values(m), torch.linalg.svdvals(m)
    assert torch.allclose(mine, ref, atol=1e-13)
    g_mine, = torch.autograd.grad((weights * mine).sum(), m)
    g_ref, = torch.autograd.grad((weights * ref).sum(), m)
    assert torch.allclose(g_mine, g_ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 200), (40, 40), (200, 40)])
def test_singular_values_keep_full_float64_accuracy_when_ill_conditioned(shape):
    # Known σ from 1 down to 1e-12: an SVD-quality result (a Gram-matrix shortcut is off by ~1e-9 absolute here).
    torch.manual_seed(2)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64))
    sigma = torch.logspace(0, -12, k, dtype=torch.float64)
    got = singular_values((u * sigma) @ v.T).sort(descending=True).values
    assert (got - sigma).abs().max() < 1e-14
    assert ((got - sigma).abs() / sigma)[sigma >= 1e-9].max() < 1e-5


@pytest.mark.parametrize("shape", [(40, 200), (3, 64, 576), (2, 32, 32), (30, 12)])
def test_gram_route_vectors_give_the_svd_values_and_gradient_down_to_1e_6(shape):
    """The CUDA route (eigenvectors of a·aᵀ, sync-free there) run on the CPU: σ from 1 down to 1e-6·σ_max, as the
    QR + SVD route within 1e-8 relative (7.5e-10 at worst here, on the 64×576 batch; the LAPACK build and its thread
    count move the last digits, so 1e-9 was too close), gradients within 1e-4 of their largest entry (a vector of a
    close pair of small σ² is resolved to eps·σ_max²/gap only, and the gradient U diag(g) Vᵀ sees it); below, the
    documented limit."""
    torch.manual_seed(3)
    *batch, rows, cols = shape
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, dtype=torch.float64))
    sigma = torch.logspace(0, -6, k, dtype=torch.float64)
    m = ((u * sigma) @ v.mT).requires_grad_()
    a = short_side(m)
    got, ref = singular_values(a, left_vectors(a, "gram")), singular_values(a, left_vectors(a, "svd"))
    assert (((got - ref) / ref).abs() < 1e-8).all()
    assert torch.all(got[..., :-1] >= got[..., 1:])  # descending, as the SVD route
    weights = torch.randn_like(got)
    g_got, = torch.autograd.grad((weights * got).sum(), m)
    g_ref, = torch.autograd.grad((weights * ref).sum(), m)
    assert (g_got - g_ref).abs().max() < 1e-4 * g_ref.abs().max()
    # S̃ sums k(k−1)/2 log terms (2016 for k = 64): 1e-8 absolute is ~1e-11 of it (1.05e-9 seen in a test worker)
    assert dln_entropy(got, 3).sub(dln_entropy(ref, 3)).abs().max() < 1e-8


def test_vector_route_is_sync_free_gram_on_cuda_and_full_accuracy_svd_elsewhere():
    assert vector_route("cuda") == "gram" and vector_route("cpu") == "svd"


@pytest.mark.parametrize("d,N,s", [(3, 10, 0.7), (2, 2, 1.3), (5, 4, 0.25), (4, 5, 2.0)])
def test_gradient_at_scaled_orthogonal_matrix(d, N, s):
    # docs/dln.md §5(b): at X = s·Q all singular values are equal, yet ∇_X S = ((d−1)(N−1)/(2Ns))·Q exactly.
    torch.manual_seed(d + N)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    x = (s * q).requires_grad_(True)
    value = matrix_entropy(x, N, normalize="none")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad, (d - 1) * (N - 1) / (2 * N * s) * q, atol=1e-13)


@pytest.mark.parametrize("m", [
    torch.zeros(4, 4),                                            # all singular values zero
    torch.diag(torch.tensor([1.0, 0.5, 0.0, 0.0])),               # exactly singular, repeated zero
    torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 4.0)),  # rank one, 5×3
    torch.cat([torch.randn(3, 30), torch.zeros(1, 30)]),          # dead conv filter, wide (QR path)
    torch.cat([torch.randn(30, 3), torch.zeros(30, 1)], 1),       # tall, rank-deficient (QR path)
    torch.eye(6),                                                  # all repeated
], ids=["zero", "singular", "rank1-5x3", "wide-dead-row", "tall-dead-col", "identity"])
@pytest.mark.parametrize("N", [2, 5])
def test_singular_or_rectangular_inputs_give_finite_gradients(m, N):
    m = m.double().requires_grad_(True)
    value = matrix_entropy(m, N)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(m.grad).all()


def test_float32_weights_are_computed_in_float64():
    torch.manual_seed(1)
    m = torch.randn(7, 7)
    assert matrix_entropy(m, 3).dtype == torch.float64
    assert matrix_entropy(m, 3).item() == pytest.approx(matrix_entropy(m.double(), 3).item(), abs=1e-12)


@pytest.mark.parametrize("normalize,expected", [
    ("none", math.sqrt(0.3 * (4 - 1) * (5 - 1) / (2 * 5) / 0.5)),   # σ_* = sqrt(λ κ'/μ) = 0.848528137 (§5(b))
    ("values", math.sqrt(0.3 * (1 - 1 / 5) / 0.5)),                 # per-σ barrier (1−1/N) log σ: σ_*² = λ(1−1/N)/μ
    ("pairs", math.sqrt(0.3 * (5 - 1) / (5 * 4) / 0.5)),            # κ'/(d(d−1)/2): σ_*² = λ(N−1)/(N d μ)
])
def test_weight_decay_equilibrium(normalize, expected):
    # docs/dln.md §5(b): (μ/2)‖X‖² − λ S̃_5(X) on a 4×4 X is minimized on the orbit X = σ_* Q.
    mu, lam, N = 0.5, 0.3, 5
    torch.manual_seed(0)
    x = (0.5 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = 0.5 * mu * (x * x).sum() - lam * matrix_entropy(x, N, normalize)
        f.backward()
        return f

    for _ in range(3):
        opt.step(closure)
    sigma = torch.linalg.svdvals(x.detach())
    assert expected == pytest.approx({"none": 0.848528137, "values": 0.692820323, "pairs": 0.346410162}[normalize])
    assert torch.allclose(sigma, torch.full((4,), expected, dtype=torch.float64), atol=1e-7), sigma


# ---- the method on real models ---------------------------------------------------------------------------------

def attach(hparams, model_name="mlp", input_shape=(1, 40), **model_kwargs):
    torch.manual_seed(0)
    method = DLNEntropy(hparams)
    model = models.create_model(model_name, 10, input_shape, **model_kwargs)
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, input_shape))
    return method, model, capture


def numpy_entropy(w: np.ndarray, N: int) -> float:
    """Hand computation: numpy SVD of the reshaped weight, then the ratio form of docs/dln.md §2.1."""
    sigma = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), compute_uv=False)
    return ratio_form(sigma, N)


def train_steps(method, model, capture, input_shape, steps=3):
    x = torch.randn(16, *input_shape)
    y = torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    regs = []
    for step in range(steps):
        task, reg = engine.train_step(model, method, capture, opt, x, y, step=step)
        assert torch.isfinite(task) and torch.isfinite(reg)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        regs.append(reg)
    return regs


@pytest.mark.parametrize("normalize", ["values", "pairs", "none"])
def test_loss_on_mlp_equals_hand_computed_sum(normalize):
    hp = {"strength": 0.02, "beta": 0.5, "depth": 4, "normalize": normalize}
    method, model, capture = attach(hp)
    assert not capture.keys()  # a weight-space method captures nothing
    weights = {name: model.get_submodule(name).weight.detach().numpy().copy() for name in ("fc1", "fc2")}
    expected = 0.0
    for w in weights.values():
        k = min(w.shape)
        n = {"values": (k - 1) / 2, "pairs": k * (k - 1) / 2, "none": 1.0}[normalize]
        expected += numpy_entropy(w, 4) / n
    expected *= -0.02 / 0.5
    regs = train_steps(method, model, capture, (1, 40))
    # train_step's first regularizer value is computed on the initial weights; it comes back in float32
    assert regs[0].dtype == torch.float32
    assert regs[0].item() == pytest.approx(expected, rel=1e-6)
    assert regs[1].item() != regs[0].item()  # the weights moved, the penalty with them
    assert set(method.diagnostics()) == {"dln_entropy/total"}


def test_gradient_on_mlp_weight_is_closed_form():
    # ∇_W (−c S̃/n) = −(c/n) U diag(∂S/∂σ) Vᵀ with ∂S/∂σ from docs/dln.md §2.3 (numpy SVD, independent of the code).
    N, c = 3, 0.1
    method, model, _ = attach({"strength": c, "depth": N, "layers": "name:fc2"}, widths=(12, 9))
    w = model.fc2.weight.detach().double().numpy()
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    k = len(sigma)
    want = -(c / ((k - 1) / 2)) * (u * np.array(closed_form_grad(sigma, N))) @ vt
    step = engine.StepContext(inputs=torch.zeros(1), targets=torch.zeros(1), logits=torch.zeros(1),
                              task_loss=torch.zeros(()))
    method.loss(step).backward()
    assert np.allclose(model.fc2.weight.grad.double().numpy(), want, rtol=1e-5, atol=1e-7)
    assert model.fc1.weight.grad is None and model.head.weight.grad is None  # only the selected layer


def test_conv_kernels_are_reshaped_and_batched_by_shape():
    # cnn channels (8, 8, 16): block2.conv and block3.conv differ, two 8-row kernels of block1/2 differ in C_in.
    hp = {"strength": 1.0, "depth": 3, "normalize": "none", "layers": "weights"}
    method, model, capture = attach(hp, "cnn", (1, 8, 8), channels=(8, 8, 8))
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(method.modules) == sorted(names)
    assert ["block2.conv", "block3.conv"] in method.groups  # same 8 × 72 shape: one batched SVD
    got = {k: v.item() for k, v in method.entropies().items()}
    for name in names:
        assert got[name] == pytest.approx(numpy_entropy(model.get_submodule(name).weight.detach().numpy(), 3),
                                          rel=1e-9, abs=1e-9)
    train_steps(method, model, capture, (1, 8, 8))


def test_composed_with_spectral_norm_reads_the_forward_weight_without_a_power_iteration():
    # Another method's spectral norm on fc2 (torch's parametrization): our penalty sees W/σ as the forward pass
    # did, and reading it in training mode must not advance that method's power iteration (its u, v buffers).
    torch.manual_seed(0)
    model = models.create_model("mlp", 10, (1, 40), widths=(12, 9))
    torch.nn.utils.parametrizations.spectral_norm(model.fc2)
    method = DLNEntropy({"strength": 1.0, "normalize": "none", "layers": "name:fc2"})
    capture = engine.ActivationCapture(model)
    model.train()
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 40)))
    model(torch.randn(4, 40))  # the training forward: one power iteration
    sn = model.fc2.parametrizations.weight[0]
    u_before = sn._u.clone()
    with torch.no_grad():
        model.eval()
        w_forward = model.fc2.weight.numpy().copy()
        model.train()
    step = engine.StepContext(inputs=torch.zeros(1), targets=torch.zeros(1), logits=torch.zeros(1),
                              task_loss=torch.zeros(()))
    penalty = method.loss(step)
    assert torch.equal(sn._u, u_before) and sn.training and model.fc2.parametrizations.weight.training
    assert penalty.item() == pytest.approx(-numpy_entropy(w_forward, 3), rel=1e-6)
    penalty.backward()
    assert torch.isfinite(model.fc2.parametrizations.weight.original.grad).all()


def test_product_target_on_linear_stack():
    # X = head · fc2 · fc1 (10 × 40), N = 3 layers (depth is ignored), normalized per singular value.
    method, model, capture = attach({"strength": 0.1, "depth": 7, "target": "product", "layers": "linear"},
                                    widths=(16, 12))
    ws = [model.get_submodule(n).weight.detach().double().numpy() for n in ("fc1", "fc2", "head")]
    x = ws[2] @ ws[1] @ ws[0]
    expected = -0.1 * numpy_entropy(x, 3) / ((10 - 1) / 2)
    regs = train_steps(method, model, capture, (1, 40))
    assert regs[0].item() == pytest.approx(expected, rel=1e-6)
    assert list(method.diagnostics()) == ["dln_entropy/total"]


def one_line_error(exc_type, fn):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("hp,fragment", [
    ({"beta": 0.0}, "dln_entropy.beta=0.0 is outside (0, inf)"),
    ({"strength": -1.0}, "dln_entropy.strength=-1.0 is outside [0, inf)"),
    ({"depth": 1}, "dln_entropy.depth=1 is outside [2, 64]"),
    ({"depth": "1"}, "dln_entropy.depth=1 is outside [2, 64]"),  # --set strings are typed first
    ({"depth": 2.5}, "dln_entropy.depth=2.5 is not an integer"),
    ({"target": "sum"}, "dln_entropy.target='sum' is not one of: each, product"),
    ({"normalize": "max"}, "dln_entropy.normalize='max' is not one of"),
    ({"lam": 1.0}, "has no hparam 'lam'"),
])
def test_hparam_errors_are_one_line(hp, fragment):
    assert fragment in one_line_error(HparamError, lambda: DLNEntropy(hp))


@pytest.mark.parametrize("hp,model_kwargs,fragment", [
    ({"layers": "all"}, {}, "dln_entropy.layers='all' selects no module with a weight matrix"),
    ({"target": "product", "layers": "name:fc1"}, {}, "selects 1 Linear layer; the product needs at least 2"),
    ({"target": "product", "layers": "name:[fh][ce][1a]*"}, {"widths": (16, 8)},
     "shapes do not chain, head.in_features=8 but fc1.out_features=16"),
    ({"target": "product", "layers": "linear"}, {"input_shape": (1,)}, "the product is 10 × 1, a single row"),
    ({"layers": "name:fc1"}, {"input_shape": (1,), "widths": (1, 4)}, "selects only weights with a single row"),
])
def test_layer_rule_and_product_errors_are_one_line(hp, model_kwargs, fragment):
    kwargs = dict(model_kwargs)
    input_shape = kwargs.pop("input_shape", (1, 40))
    assert fragment in one_line_error(HparamError, lambda: attach(hp, "mlp", input_shape, **kwargs))


def test_product_of_convs_is_refused_and_unknown_rule_is_one_line():
    msg = one_line_error(HparamError, lambda: attach({"target": "product"}, "cnn", (1, 8, 8)))
    assert "block1.conv is a Conv2d, not nn.Linear" in msg
    assert "unknown rule" in one_line_error(RegbenchError, lambda: attach({"layers": "bogus"}))


def test_search_space_values_are_valid_and_registered():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        space = DLNEntropy.search_space(trial)
        assert set(space) == {"strength", "depth", "layers"}
        DLNEntropy(space)  # validates
        study.tell(trial, 0.0)
    assert registry.method_class("dln_entropy") is DLNEntropy


# ---- issue 18: every=k, svd_every=k ----------------------------------------------------------------------------

def test_every_k_computes_the_penalty_on_due_steps_only():
    method, model, capture = attach({"every": 2})
    regs = train_steps(method, model, capture, (1, 40), steps=4)
    assert [float(r) != 0 for r in regs] == [True, False, True, False]


def test_svd_every_reuses_the_vectors_and_is_exact_on_refresh_steps():
    """svd_every=3: an SVD on penalties 0 and 3 only; in between σ_i = ‖Wᵀu_i‖ from the stored vectors (the exact
    value when the weight has not moved, a close one after SGD steps); the schedule survives a state_dict trip."""
    method, model, capture = attach({"svd_every": 3, "every": 1})
    exact, _m, _c = attach({"every": 1})
    svds = []
    real_left = __import__("regbench.methods.dln_entropy", fromlist=["left_vectors"]).left_vectors

    def counting(a):
        svds.append(a.shape)
        return real_left(a)
    import regbench.methods.dln_entropy as mod
    mod.left_vectors = counting
    try:
        regs = train_steps(method, model, capture, (1, 40), steps=4)
        ref = train_steps(exact, _m, _c, (1, 40), steps=4)
    finally:
        mod.left_vectors = real_left
    n_groups = len(method.groups)
    assert len(svds) == 2 * n_groups + 4 * len(exact.groups)
    assert regs[0].item() == ref[0].item()  # penalty 0 refreshes: the exact value
    assert regs[1].item() == pytest.approx(ref[1].item(), rel=1e-2) and regs[1].item() != ref[1].item()
    with torch.no_grad():  # the weights moved since the last SVD: stale close to, not equal to, exact
        stale, fresh = method.entropies(refresh=False), method.entropies(refresh=True)
        again_fresh = method.entropies(refresh=False)  # vectors just refreshed: exact again
    for name, value in fresh.items():
        w = model.get_submodule(name).weight.detach()
        assert value.item() == pytest.approx(matrix_entropy(w, 3).item(), rel=1e-9)
        assert stale[name].item() == pytest.approx(value.item(), rel=1e-2) and stale[name].item() != value.item()
        assert again_fresh[name].item() == pytest.approx(value.item(), rel=1e-9)
    state = method.state_dict()
    again, _m2, _c2 = attach({"svd_every": 3, "every": 1})
    again.load_state_dict(state)
    assert again._computed == 4 and all(torch.equal(again._vectors[g], method._vectors[g]) for g in method._vectors)


@pytest.mark.parametrize("bad", [{"every": 0}, {"svd_every": 0}, {"every": 1.5}, {"svd_every": True}])
def test_every_and_svd_every_are_checked(bad):
    with pytest.raises(HparamError):
        DLNEntropy(bad)
