"""SHADE (seed 002, Sec. 2.3 and Algorithm 1): the fused implementation against plain hand-written references.

The references below loop over units and samples with Python floats (float64), straight from the paper's formulas:
eq. 4-5 for the penalty and Algorithm 1 lines 4-5 for the moving averages, a convolutional unit being a channel
whose positions are extra samples (docs/methods.md §2.4).
"""
import math

import pytest
import torch
from regbench.methods.base import StepContext
from regbench.methods.shade import SHADE, ShadeAverages, ShadePenalty, _Plan

from regbench import engine, models
from regbench.errors import HparamError


# ---- plain references ----------------------------------------------------------------------------------------------
def p1(y: float) -> float:  # p(Z=1|y) = 1 − exp(−ReLU(y))
    return 1.0 - math.exp(-max(y, 0.0))


def columns(y: torch.Tensor) -> list[list[float]]:
    """One list of samples per unit: channel c of [B, C, *positions] holds every batch element and position."""
    return [y[:, c].reshape(-1).tolist() for c in range(y.shape[1])]


def hand_penalty(ys, state, reduction="sum"):
    """Σ_layers Σ_units (1/K) Σ_k Σ_z p(z|y_k)(y_k − μ_z)² (eq. 4-5), or the per-layer mean over units."""
    total = 0.0
    for key, y in ys.items():
        layer = 0.0
        for i, col in enumerate(columns(y)):
            mu0, mu1 = state[key]["mu0"][i], state[key]["mu1"][i]
            layer += sum((1 - p1(v)) * (v - mu0) ** 2 + p1(v) * (v - mu1) ** 2 for v in col) / len(col)
        total += layer if reduction == "sum" else layer / y.shape[1]
    return total


def hand_update(ys, state, lam=0.8):
    """Algorithm 1 lines 4 then 5 for z = 0 and z = 1; line 5 divides by the p_z that line 4 has just updated."""
    new = {}
    for key, y in ys.items():
        s = {name: list(values) for name, values in state[key].items()}
        for i, col in enumerate(columns(y)):
            for z in (0, 1):
                post = [p1(v) if z == 1 else 1 - p1(v) for v in col]
                s[f"p{z}"][i] = lam * s[f"p{z}"][i] + (1 - lam) * sum(post) / len(col)                       # line 4
                s[f"mu{z}"][i] = lam * s[f"mu{z}"][i] + (1 - lam) * sum(
                    q / s[f"p{z}"][i] * v for q, v in zip(post, col)) / len(col)                               # line 5
        new[key] = s
    return new


def initial(ys):  # Algorithm 1 line 1
    return {k: {"p0": [0.5] * y.shape[1], "p1": [0.5] * y.shape[1], "mu0": [-1.0] * y.shape[1],
                "mu1": [1.0] * y.shape[1]} for k, y in ys.items()}


def method_state(method) -> dict:
    return {k: {n: v.tolist() for n, v in method.averages.view(k).items()} for k in method.keys}


def attach(method, model_name="cnn1d", input_shape=(40,)):
    """``method`` on a real model through the engine's real capture and context; returns the model."""
    model = models.create_model(model_name, 10, input_shape)
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, input_shape))
    return model


def step_with(acts) -> StepContext:
    return StepContext(inputs=None, targets=None, logits=None, task_loss=None, activations=acts)


def cnn1d_activations(seed, scale=1.5, shift=0.2):
    """Pre-activations shaped like cnn1d's hooks (32 channels × positions, then 128 units), in float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"block1.act<input": (3, 32, 4), "block2.act<input": (3, 32, 4), "block3.act<input": (3, 32, 2),
              "act_fc<input": (3, 128)}
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).requires_grad_()
            for k, s in shapes.items()}


# ---- Algorithm 1 and eq. 4-5, step by step -------------------------------------------------------------------------
def test_three_steps_of_algorithm_1_on_conv_channels_match_the_hand_reference():
    method = SHADE({"weight": 0.1})
    attach(method)
    assert method.keys == ["block1.act<input", "block2.act<input", "block3.act<input", "act_fc<input"]
    hand = None
    for t in range(3):
        acts = cnn1d_activations(t, scale=1.0 + t, shift=0.3 * t)
        ys = {k: v.detach() for k, v in acts.items()}
        hand = hand or initial(ys)
        step = step_with(acts)
        loss = method.loss(step)  # uses the averages as they were before this batch
        assert loss.item() == pytest.approx(0.1 * hand_penalty(ys, hand), rel=1e-12)
        loss.backward()
        method.after_step(step)
        hand = hand_update(ys, hand)
        got = method_state(method)
        for key in hand:
            for name in ("p0", "p1", "mu0", "mu1"):
                assert got[key][name] == pytest.approx(hand[key][name], rel=1e-12, abs=1e-14), (t, key, name)


def test_line_5_uses_the_p_z_just_updated_in_line_4():
    """The reference above is line 4 then line 5; dividing by the previous p_z would give other μ (so the test can
    tell the orders apart), and the method's μ are the in-order ones."""
    method = SHADE()
    attach(method, "mlp", (1, 40))
    y = torch.tensor([[2.0, -1.0, 0.5]] * 2 + [[3.0, 0.1, -2.0]] * 2, dtype=torch.float64)
    acts = {"act1<input": y.repeat(1, 86)[:, :256], "act2<input": y.repeat(1, 86)[:, :256]}
    step = step_with(acts)
    method.loss(step)
    method.after_step(step)
    ys = {k: v for k, v in acts.items()}
    in_order = hand_update(ys, initial(ys))["act1<input"]["mu1"][0]
    col = columns(acts["act1<input"])[0]
    stale = 0.8 * 1.0 + 0.2 * sum(p1(v) / 0.5 * v for v in col) / len(col)  # line 5 with the old p1 = 0.5
    assert abs(in_order - stale) > 0.1
    assert method.averages.view("act1<input")["mu1"][0].item() == pytest.approx(in_order, rel=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("detach_posterior", [False, True])
def test_penalty_and_gradient_match_eq_4_5_written_naively(reduction, detach_posterior):
    """4-D conv maps, 3-D and 2-D layers; value and ∂/∂y against autograd through the literal per-unit formula."""
    g = torch.Generator().manual_seed(3)
    ys = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in [(2, 3, 4, 5), (4, 2, 6), (5, 7)]]
    averages = ShadeAverages(["a", "b", "c"], [3, 2, 7], dtype=torch.float64)
    averages.mu0.copy_(torch.randn(12, generator=g) - 1)
    averages.mu1.copy_(torch.randn(12, generator=g) + 1)
    out = ShadePenalty.apply(_Plan(averages, 0.25, reduction, detach_posterior), *ys)

    naive = 0.0
    for key, y in zip("abc", ys):
        cols = y.transpose(0, 1).reshape(y.shape[1], -1)  # [units, K]
        post = 1 - torch.exp(-torch.relu(cols))
        post = post.detach() if detach_posterior else post
        s = averages.view(key)
        term = ((1 - post) * (cols - s["mu0"][:, None]) ** 2 + post * (cols - s["mu1"][:, None]) ** 2).mean(1)
        naive = naive + (term.sum() if reduction == "sum" else term.mean())
    naive = 0.25 * naive
    ys_plain = {k: y.detach() for k, y in zip("abc", ys)}
    state = {k: {n: v.tolist() for n, v in averages.view(k).items()} for k in "abc"}
    assert naive.item() == pytest.approx(0.25 * hand_penalty(ys_plain, state, reduction), rel=1e-12)
    assert out.item() == pytest.approx(naive.item(), rel=1e-12)
    for got, want in zip(torch.autograd.grad(out, ys), torch.autograd.grad(naive, ys)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_custom_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(4)
    ys = [torch.randn(s, generator=g, dtype=torch.float64) * 2 for s in [(2, 3, 5), (3, 4)]]
    for y in ys:  # keep away from the kink at y = 0 (p(Z=1|y) has a corner there)
        y[y.abs() < 0.05] = 0.3
        y.requires_grad_()
    averages = ShadeAverages(["a", "b"], [3, 4], dtype=torch.float64)
    averages.mu0.copy_(torch.randn(7, generator=g) - 1)
    averages.mu1.copy_(torch.randn(7, generator=g) + 2)
    for reduction in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda *t, r=reduction: ShadePenalty.apply(_Plan(averages, 0.7, r, False), *t), ys, eps=1e-6, atol=1e-7)


def test_zero_pre_activation_follows_relus_convention():
    """At y = 0 exactly, p(Z=1|y) is taken as flat (as ReLU's gradient is 0 there): ∂/∂y = 2(y − μ0)."""
    method = SHADE({"weight": 1.0})
    attach(method, "mlp", (1, 40))
    zero = torch.zeros(2, 256, dtype=torch.float64, requires_grad=True)
    other = torch.ones(2, 256, dtype=torch.float64)
    loss = method.loss(step_with({"act1<input": zero, "act2<input": other}))
    assert loss.item() == pytest.approx(256 * 1.0 + 256 * hand_penalty({"x": other[:, :1]}, initial({"x": other[:, :1]})))
    (grad,) = torch.autograd.grad(loss, zero)
    torch.testing.assert_close(grad, torch.full_like(zero, 2 * (0 - (-1.0)) / 2))


# ---- state: buffers, checkpoints, eval mode ------------------------------------------------------------------------
def test_averages_are_registered_buffers_and_a_resumed_run_continues_identically():
    first = SHADE({"weight": 0.1})
    attach(first)
    for t in range(2):
        step = step_with(cnn1d_activations(t))
        first.loss(step).backward()
        first.after_step(step)
    assert set(dict(first.averages.named_buffers())) == {"p0", "p1", "mu0", "mu1"}
    assert first.averages.p0.numel() == 32 * 3 + 128
    saved = first.state_dict()

    resumed = SHADE({"weight": 0.1})
    resumed.load_state_dict(saved)  # before attach, as a resuming engine may do
    attach(resumed)
    for who in (first, resumed):
        step = step_with(cnn1d_activations(7))
        who.last = who.loss(step)
        who.last.backward()
        who.after_step(step)
    assert resumed.last.item() == first.last.item()
    for name in ("p0", "p1", "mu0", "mu1"):
        assert torch.equal(getattr(resumed.averages, name), getattr(first.averages, name))
    saved["mu0"].add_(1.0)  # the checkpoint is a copy, not a view of the live state
    assert not torch.equal(saved["mu0"], first.averages.mu0)


def test_state_follows_the_activations_dtype_and_device_and_refuses_another_layout():
    method = SHADE()
    attach(method)
    acts = {k: v.detach().float() for k, v in cnn1d_activations(0).items()}
    method.loss(step_with(acts))
    assert method.averages.p0.dtype == torch.float32 and method.averages.p0.device == acts["act_fc<input"].device
    state = method.state_dict()
    other = SHADE()
    attach(other, "mlp", (1, 40))
    with pytest.raises(ValueError, match="saved state is for layers"):
        other.load_state_dict(state)


def test_no_update_in_eval_mode_and_detach_leaves_the_model_as_it_was():
    method = SHADE({"weight": 0.1})
    model = models.create_model("cnn", 10, (1, 8, 8))
    keys = list(model.state_dict())
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.train_step(model, method, capture, opt, x, y)
    before = {k: v.clone() for k, v in method.averages.state_dict().items()}
    model.eval()
    _, reg = engine.train_step(model, method, capture, opt, x, y)
    assert reg.item() > 0  # the penalty is still computed ...
    for k, v in method.averages.state_dict().items():
        assert torch.equal(v, before[k]), k  # ... but Algorithm 1 does not run outside training
    model.train()
    engine.train_step(model, method, capture, opt, x, y)
    assert not torch.equal(method.averages.mu1, before["mu1"])
    method.detach(model)
    capture.remove()
    assert list(model.state_dict()) == keys


def test_a_real_training_step_updates_each_channel_from_its_positions():
    """Through engine.train_step on the 2-D cnn: the averages after one step are Algorithm 1 applied to the
    pre-activations that step saw (captured here by a second hook), per channel over batch × positions."""
    torch.manual_seed(0)
    method = SHADE({"weight": 0.01})
    model = models.create_model("cnn", 10, (1, 8, 8))
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 8, 8)))
    seen = {}
    for name, module in model.named_modules():
        if f"{name}<input" in method.keys:
            module.register_forward_pre_hook(lambda m, inp, key=f"{name}<input": seen.__setitem__(
                key, inp[0].detach().double().clone()))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    engine.train_step(model, method, capture, torch.optim.SGD(model.parameters(), lr=0.01), x, y)
    assert list(seen) == method.keys and seen["block1.act<input"].shape == (4, 32, 8, 8)
    hand = hand_update(seen, initial(seen))
    got = method_state(method)
    for key in hand:
        for name in ("p0", "mu0", "mu1"):
            assert got[key][name] == pytest.approx(hand[key][name], rel=2e-5, abs=1e-6), (key, name)


def test_a_stale_graph_is_refused_rather_than_given_a_wrong_gradient():
    method = SHADE()
    attach(method)
    first = method.loss(step_with(cnn1d_activations(0)))
    method.loss(step_with(cnn1d_activations(1)))  # reuses the workspaces and the μ snapshot
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


@pytest.mark.parametrize("bad", [{"weight": -1.0}, {"momentum": 1.0}, {"momentum": -0.1}, {"reduction": "max"}])
def test_invalid_hparams_are_rejected(bad):
    with pytest.raises(HparamError, match=f"shade.{next(iter(bad))}="):
        SHADE(bad)


def test_a_unit_that_stays_dead_keeps_finite_averages():
    """All-negative inputs drive p1 geometrically to 0 (float32 denormals after ~400 steps): line 5's 0/p1 must stay
    finite there."""
    method = SHADE()
    attach(method, "mlp", (1, 40))
    dead = -torch.rand(4, 256) - 0.1
    live = torch.randn(4, 256)
    for _ in range(520):
        step = step_with({"act1<input": dead, "act2<input": live})
        method.loss(step)
        method.after_step(step)
    s = method.averages.view("act1<input")
    assert torch.all(s["p1"] < 1e-40) and torch.isfinite(s["mu1"]).all() and torch.isfinite(s["mu0"]).all()
    assert torch.isfinite(method.loss(step_with({"act1<input": dead, "act2<input": live})))


def test_bfloat16_activations_as_under_autocast_get_float32_state_and_bfloat16_gradients():
    method = SHADE({"weight": 0.1})
    attach(method)
    acts = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in cnn1d_activations(0).items()}
    loss = method.loss(step_with(acts))
    loss.backward()
    assert loss.dtype == torch.float32 and method.averages.mu0.dtype == torch.float32
    exact = {k: v.detach().double() for k, v in acts.items()}
    assert loss.item() == pytest.approx(0.1 * hand_penalty(exact, initial(exact)), rel=1e-5)
    assert all(a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all() for a in acts.values())


def test_channels_last_maps_keep_their_layout_in_the_gradient():
    """Real image batches often arrive NHWC, so every activation is channels_last; a gradient in another layout made
    the batch-norm backward ~20× slower (measured on resnet18)."""
    y = torch.randn(4, 32, 5, 5, generator=torch.Generator().manual_seed(5))
    grads, values = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        method = SHADE({"weight": 0.1, "layers": "name:block1.act"})
        attach(method, "cnn", (1, 8, 8))
        yl = (y.clone().requires_grad_() * 1.0).contiguous(memory_format=layout)  # an activation, not a leaf
        loss = method.loss(step_with({"block1.act<input": yl}))
        (grad,) = torch.autograd.grad(loss, yl)  # as the layer below receives it (a leaf's .grad is re-laid out)
        assert grad.is_contiguous(memory_format=layout)
        grads.append(grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])
