"""spectral_norm, dropout and weight_decay against closed forms and hand-computed optimizer steps, on tiny real
models attached through the engine's real context (docs/methods.md §3.1, §4.1, §4.2)."""
import copy
import math

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regbench.methods.spectral_norm as sn_module
from regbench import engine, models
from regbench.config import RunConfig
from regbench.errors import ConfigError, HparamError
from regbench.methods.baseline import Baseline
from regbench.methods.dropout import Dropout
from regbench.methods.spectral_norm import SpectralNorm
from regbench.methods.weight_decay import WeightDecay, weight_decay_groups


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and on a busy 2-core box two threads spin (measured 20×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def attach(method, model, input_shape, num_classes=10):
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, num_classes, input_shape))
    return capture


def build(name, input_shape, method=None, seed=0):
    torch.manual_seed(seed)
    return models.create_model(name, 10, input_shape, **(method.model_options() if method else {}))


def space(cls):
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = cls.search_space(trial)
    cls(values)  # every suggestion is a valid hparam set
    return trial.distributions


# ---------------------------------------------------------------------------------------------------------------
# spectral_norm
# ---------------------------------------------------------------------------------------------------------------

def test_sn_divides_a_known_matrix_by_its_largest_singular_value():
    # [[2, 1], [1, 2]] has singular values 3 and 1: W_SN = W / 3. diag(3, 1) → diag(1, 1/3).
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        model[2].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    attach(SpectralNorm(), model, (2,))
    model.eval()  # no further power iteration: the 15 at registration must already give σ
    assert torch.allclose(model[0].weight, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)
    assert torch.allclose(model[2].weight, torch.tensor([[1.0, 0.0], [0.0, 1 / 3]]), atol=1e-6)
    x = torch.tensor([[1.0, -2.0]])
    hand = F.linear(torch.relu(x @ torch.tensor([[2.0, 1.0], [1.0, 2.0]]).T / 3), torch.diag(torch.tensor([1, 1 / 3])),
                    model[2].bias)
    assert torch.allclose(model(x), hand, atol=1e-6)


@pytest.mark.parametrize("model_name,input_shape", [("mlp", (1, 40)), ("cnn", (1, 8, 8)), ("cnn1d", (40,))])
def test_sn_largest_singular_value_of_each_reshaped_weight_is_one(model_name, input_shape):
    model = build(model_name, input_shape)
    method = SpectralNorm({"n_power_iterations": 5})
    attach(method, model, input_shape)
    n_weights = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())
    assert len(method.layers) == n_weights  # rule "weights": every Conv and Linear, classifier included
    sd = model.state_dict()
    model.train()
    with torch.no_grad():
        for _ in range(20):  # power iterations happen on training-mode forwards
            model(torch.randn(4, *input_shape))
    model.eval()
    for name, layer in method.layers:
        c_out = layer.parametrizations.weight.original.shape[0]
        sigma = torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item()  # C_out × (C_in·k…)
        assert 1 - 1e-5 <= sigma <= 1 + 5e-3, (name, sigma)  # uᵀWv ≤ σ_max, so W/(uᵀWv) has σ ≥ 1
        assert sd[f"{name}.parametrizations.weight.0._u"].shape == (c_out,)
        assert sd[f"{name}.parametrizations.weight.0._v"].shape == (layer.weight[0].numel(),)
        assert f"{name}.weight" not in sd and f"{name}.parametrizations.weight.original" in sd


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_sn_one_training_forward_runs_n_power_iterations(iterations):
    model = build("cnn", (1, 8, 8))
    method = SpectralNorm({"n_power_iterations": iterations})
    attach(method, model, (1, 8, 8))
    _, conv = method.layers[1]
    p = conv.parametrizations.weight[0]
    w = conv.parametrizations.weight.original.detach().flatten(1)
    u, v = p._u.clone(), p._v.clone()
    for _ in range(iterations):  # the power method by hand
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.T @ u, dim=0)
    model.train()
    model(torch.randn(4, 1, 8, 8))
    assert torch.allclose(p._u, u, atol=1e-6) and torch.allclose(p._v, v, atol=1e-6)
    model.eval()  # reading the weight in training mode would iterate again
    assert torch.allclose(conv.weight, conv.parametrizations.weight.original / torch.dot(u, w @ v), atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2])
def test_sn_equals_torchs_parametrization_after_the_same_updates(iterations):
    """Issue 18: the method's batched once-per-forward power iteration gives torch's training-mode parametrization
    (spectral_norm applied directly) after the same SGD updates: same u, v, same W_SN, same outputs. The model has
    three Linear weights of one shape (batched into one bmm) and two lone ones (torch's own mv)."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    ours, theirs = net(), net()
    method = SpectralNorm({"n_power_iterations": iterations})
    torch.manual_seed(2)  # the same random u, v at registration (15 power iterations from them)
    attach(method, ours, (12,))
    torch.manual_seed(2)
    for module in theirs:
        if isinstance(module, nn.Linear):
            nn.utils.parametrizations.spectral_norm(module, n_power_iterations=iterations)
    assert sum(len(g) > 1 for g in method._groups) == 1
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(32, 12, generator=g), torch.randint(0, 10, (32,), generator=g)
        for model, opt in zip((ours, theirs), opts):
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    ours.eval()
    theirs.eval()
    for a, b in zip(ours, theirs):
        if isinstance(a, nn.Linear):
            pa, pb = a.parametrizations.weight[0], b.parametrizations.weight[0]
            assert torch.allclose(pa._u, pb._u, rtol=1e-5, atol=1e-6) and torch.allclose(pa._v, pb._v, rtol=1e-5,
                                                                                         atol=1e-6)
            assert torch.allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    x = torch.randn(8, 12, generator=g)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_sn_power_iteration_runs_once_per_training_forward_not_per_weight_read():
    """The parametrizations run in eval mode inside a training forward (the method iterated before it): reading
    the weight again in training mode does not move u."""
    model = build("cnn", (1, 8, 8))
    method = SpectralNorm({})
    attach(method, model, (1, 8, 8))
    model.train()
    model(torch.randn(4, 1, 8, 8))
    _, conv = method.layers[1]
    u = conv.parametrizations.weight[0]._u.clone()
    conv.weight  # noqa: B018 (a read of the parametrized weight)
    assert torch.equal(conv.parametrizations.weight[0]._u, u)


def test_sn_hidden_weights_leaves_the_classifier_free():
    model = build("mlp", (1, 40))
    method = SpectralNorm({"layers": "hidden-weights"})
    attach(method, model, (1, 40))
    assert [n for n, _ in method.layers] == ["fc1", "fc2"]
    assert not hasattr(model.head, "parametrizations")


def test_sn_detach_after_real_training_keeps_the_trained_function_and_the_keys():
    model = build("cnn", (1, 8, 8))
    keys = list(model.state_dict().keys())
    method = SpectralNorm({"n_power_iterations": 2})
    capture = attach(method, model, (1, 8, 8))
    optimizer = engine.build_optimizer(RunConfig(method="spectral_norm", dataset="x", model="cnn", optimizer="sgd",
                                                 lr=0.1), model, method.optimizer_options())
    raw = model.head.parametrizations.weight.original
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for step in range(3):
        engine.train_step(model, method, capture, optimizer, x, y, step=step)
    model.eval()
    with torch.no_grad():
        before = model(x)
        w_sn = model.head.weight.clone()
    model.train()  # detach in training mode must not run another power iteration
    method.detach(model)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert list(model.state_dict().keys()) == keys
    assert model.head.weight is raw  # same Parameter object: the optimizer still holds it
    assert torch.equal(model.head.weight, w_sn)
    assert type(model.head) is nn.Linear


def test_sn_bn_invariance_caveat_is_real_and_documented():
    # conv → BN in training mode: BN removes the conv's scale, so SN on the convs changes nothing but eps effects.
    x = torch.randn(32, 1, 8, 8)
    plain = build("cnn", (1, 8, 8)).train()
    normed = copy.deepcopy(plain)
    attach(SpectralNorm({"layers": "hidden-weights"}), normed, (1, 8, 8))
    with torch.no_grad():
        assert torch.allclose(plain(x), normed(x), rtol=1e-3, atol=1e-3)
    doc = sn_module.__doc__
    assert "BN invariance" in doc and "classifier" in doc and "Miyato" in doc and "§3.1" in doc


def test_sn_refuses_bad_hparams_and_a_weight_parametrized_by_someone_else():
    with pytest.raises(HparamError, match=r"^spectral_norm.n_power_iterations=0 is outside \[1, inf\)$"):
        SpectralNorm({"n_power_iterations": 0})
    assert SpectralNorm({"n_power_iterations": "5"}).hparams["n_power_iterations"] == 5
    with pytest.raises(HparamError, match="selects no Conv or Linear layer"):
        attach(SpectralNorm({"layers": "all-relu"}), build("mlp", (1, 40)), (1, 40))
    with pytest.raises(ConfigError, match="unknown rule"):
        attach(SpectralNorm({"layers": "bogus"}), build("mlp", (1, 40)), (1, 40))
    model = build("mlp", (1, 40))
    attach(SpectralNorm({"layers": "classifier"}), model, (1, 40))
    with pytest.raises(HparamError, match="'head' already has a parametrized weight"):
        attach(SpectralNorm(), model, (1, 40))
    assert not hasattr(model.fc1, "parametrizations")  # refused before touching any layer


def test_sn_search_space():
    dist = space(SpectralNorm)
    assert set(dist["n_power_iterations"].choices) == {1, 2, 5}
    assert set(dist["layers"].choices) == {"weights", "hidden-weights"}


# ---------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------

def test_dropout_masks_the_classifier_input_with_inverted_scaling():
    rate, shape = 0.3, (1, 40)
    model = build("mlp", shape)
    method = Dropout({"rate": rate})
    # a composed method attached first captures the classifier's input: it must see what the classifier sees
    capture = engine.ActivationCapture(model)
    key, = capture.request(models.select_layers(model, "classifier"), where="input")
    method.attach(model, engine.ModelContext(model, capture, 10, shape))
    pre = {}
    model.act2.register_forward_hook(lambda m, i, o: pre.setdefault("h", o.detach().clone()))
    capture.active = True
    model.train()
    torch.manual_seed(3)
    model(torch.randn(256, *shape))
    seen, h = capture.store[key].detach(), pre["h"]
    live = h != 0  # ReLU zeros stay zero whatever the mask
    ratio = seen[live] / h[live]
    kept = torch.isclose(ratio, torch.tensor(1 / (1 - rate)), rtol=1e-5)
    dropped = ratio == 0
    assert bool((kept | dropped).all())  # every unit is either zeroed or scaled by exactly 1/(1-p)
    n = int(live.sum())
    assert abs(int(dropped.sum()) - rate * n) < 5 * math.sqrt(n * rate * (1 - rate)), (int(dropped.sum()), n)
    assert bool((seen[~live] == 0).all())


def test_dropout_is_identity_in_eval_and_detach_restores_training_outputs():
    shape = (1, 40)
    x = torch.randn(64, *shape)
    model = build("mlp", shape)
    reference = copy.deepcopy(model)
    method = Dropout({"rate": 0.5})
    capture = attach(method, model, shape)
    keys = capture.request(models.select_layers(model, "pool"))  # another method's hook must survive detach
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        model.train()
        reference.train()
        assert not torch.allclose(model(x), reference(x))  # (no BN/dropout in mlp: train == eval without it)
        method.detach(model)
        assert torch.equal(model(x), reference(x))
        capture.active = True
        model(x)
    assert set(capture.store) == set(keys)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_dropout_timm_placement_builds_timm_dropout_and_drop_path():
    method = Dropout({"rate": 0.3, "placement": "timm", "drop_path_rate": 0.1})
    assert method.model_options() == {"drop_rate": 0.3, "drop_path_rate": 0.1}
    assert Dropout({"placement": "timm"}).model_options() == {"drop_rate": 0.3}
    assert Dropout().model_options() == {}
    shape = (3, 16, 16)
    model = build("resnet18", shape, method)
    capture = attach(method, model, shape)
    assert model.drop_rate == 0.3
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.1)  # linear rule: the last block gets the rate
    key, = capture.request(models.select_layers(model, "classifier"), where="input")
    pooled = {}
    model.global_pool.register_forward_hook(lambda m, i, o: pooled.setdefault("h", o.detach()))
    capture.active = True
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))
    live = pooled["h"] != 0
    dropped = (capture.store[key][live] == 0).float().mean().item()
    assert 0.2 < dropped < 0.4  # timm's F.dropout before fc, about rate·n zeros (n ≈ 4096)


def test_dropout_timm_placement_fails_in_one_line_on_builtin_nets():
    method = Dropout({"placement": "timm"})
    with pytest.raises(ConfigError) as err:
        build("mlp", (1, 40), method)
    assert "\n" not in str(err.value) and "drop_rate" in str(err.value)
    with pytest.raises(HparamError, match=r"^dropout.placement='timm' needs a timm model, not the built-in 'cnn1d'"):
        attach(method, build("cnn1d", (40,)), (40,))
    with pytest.raises(HparamError, match="built with drop_rate=0.0, not dropout.rate=0.3"):
        attach(method, build("resnet18", (3, 16, 16)), (3, 16, 16))  # built without model_options()


def test_dropout_hparam_errors_and_search_space():
    with pytest.raises(HparamError, match=r"^dropout.rate=1.0 is outside \[0, 1\)$"):
        Dropout({"rate": 1.0})
    with pytest.raises(HparamError, match="dropout.placement='everywhere' is not one of: classifier, timm"):
        Dropout({"placement": "everywhere"})
    with pytest.raises(HparamError, match="drop_path_rate=0.1 needs placement='timm'"):
        Dropout({"drop_path_rate": 0.1})
    dist = space(Dropout)
    assert set(dist) == {"rate"} and (dist["rate"].low, dist["rate"].high) == (0.0, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# weight_decay
# ---------------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """Linear → BN → ReLU → Linear, plus a 2-D parameter the model asks timm-style to keep undecayed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.full((1, 2), 1.5))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x)))) * self.scale

    def no_weight_decay(self):
        return {"scale"}


DECAYED = {"fc.weight", "head.weight"}


def grads(model, x, y):
    """∇ task loss at the model's current parameters, on a copy (the same forward the engine runs)."""
    clone = copy.deepcopy(model)
    F.cross_entropy(clone(x), y).backward()
    return {n: p.grad.clone() for n, p in clone.named_parameters()}


def run_steps(method, optimizer_name, lr, steps, **config):
    torch.manual_seed(0)
    model = Tiny()
    capture = attach(method, model, (3,), num_classes=2)
    optimizer = engine.build_optimizer(RunConfig(method=method.name, dataset="x", model="tiny",
                                                 optimizer=optimizer_name, lr=lr, **config),
                                       model, method.optimizer_options())
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    history = []  # (θ before the step, ∇L at θ)
    for step in range(steps):
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        history.append((theta, grads(model, x, y)))
        engine.train_step(model, method, capture, optimizer, x, y, step=step)
    return model, history


def test_weight_decay_sgd_is_coupled_l2_through_momentum():
    lam, lr, mu = 0.05, 0.1, 0.9
    model, ((t0, g0), (t1, g1)) = run_steps(WeightDecay({"strength": lam}), "sgd", lr, 2, momentum=mu)
    for name, p in model.named_parameters():
        decay = lam if name in DECAYED else 0.0
        b1 = g0[name] + decay * t0[name]  # torch SGD: g ← g + λθ, before momentum; first buffer = g
        assert torch.allclose(t1[name], t0[name] - lr * b1, atol=1e-6), name
        b2 = mu * b1 + g1[name] + decay * t1[name]
        assert torch.allclose(p.detach(), t1[name] - lr * b2, atol=1e-6), name
    assert not torch.equal(t1["fc.weight"], t0["fc.weight"] - lr * g0["fc.weight"])  # the decay did act


def test_weight_decay_adamw_first_step_is_decoupled():
    lam, lr, eps = 0.1, 0.01, 1e-8
    model, ((t0, g0),) = run_steps(WeightDecay({"strength": lam}), "adamw", lr, 1)
    for name, p in model.named_parameters():
        decay = lam if name in DECAYED else 0.0
        adam = g0[name] / (g0[name].abs() + eps)  # step 1: m̂ = g, v̂ = g², so m̂/(√v̂+ε) = g/(|g|+ε)
        assert torch.allclose(p.detach(), t0[name] * (1 - lr * decay) - lr * adam, atol=1e-6), name


def test_weight_decay_without_exclusion_decays_everything_and_baseline_nothing():
    lam, lr = 0.05, 0.1
    model, ((t0, g0),) = run_steps(WeightDecay({"strength": lam, "exclude_norm_bias": "false"}), "sgd", lr, 1,
                                   momentum=0.0)
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), t0[name] - lr * (g0[name] + lam * t0[name]), atol=1e-6), name
    model, ((t0, g0),) = run_steps(Baseline(), "sgd", lr, 1, momentum=0.0)  # config.weight_decay = 0
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), t0[name] - lr * g0[name], atol=1e-6), name


def test_weight_decay_groups_follow_timm_convention_on_resnet18():
    model = build("resnet18", (3, 16, 16))
    groups = weight_decay_groups(model, 5e-4)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    free = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | free == set(by_id.values()) and not decayed & free
    assert decayed == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert "fc.bias" in free and "bn1.weight" in free and "layer4.1.bn2.bias" in free
    options = WeightDecay().optimizer_options()
    assert options["weight_decay"] == 5e-4 and len(options["param_groups"](model)) == 2


def test_weight_decay_hparam_errors_and_search_space():
    with pytest.raises(HparamError, match=r"^weight_decay.strength=-0.1 is outside \[0, inf\)$"):
        WeightDecay({"strength": -0.1})
    with pytest.raises(HparamError, match="weight_decay.exclude_norm_bias='maybe' is not a valid bool"):
        WeightDecay({"exclude_norm_bias": "maybe"})
    assert WeightDecay({"exclude_norm_bias": "false"}).hparams["exclude_norm_bias"] is False
    dist = space(WeightDecay)["strength"]
    assert (dist.low, dist.high, dist.log) == (1e-5, 1e-1, True)
