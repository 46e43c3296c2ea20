"""SHADE (seed 002, Sec. 2.3 and Algorithm 1) against a hand computation, scalar by scalar."""
import math

import pytest
import torch

from helpers import attached
from regbench.errors import HparamError
from regbench.methods.base import StepContext
from regbench.methods.shade import (SHADE, initial_state, shade_penalty, units_as_columns,
                                    update_moving_averages)

Y = [[-1.0, 2.0], [0.5, 0.0], [3.0, -0.5]]  # K = 3 samples, 2 units


def p1(y):  # p(Z=1|y) = 1 − exp(−ReLU(y))
    return 1 - math.exp(-max(y, 0.0))


def hand_penalty(ys, mu0, mu1):
    """Σ_units (1/K) Σ_k Σ_z p(z|y_k)(y_k − μ_z)², with plain Python floats."""
    total = 0.0
    for i in range(len(ys[0])):
        col = [row[i] for row in ys]
        total += sum((1 - p1(y)) * (y - mu0[i]) ** 2 + p1(y) * (y - mu1[i]) ** 2 for y in col) / len(col)
    return total


def hand_update(ys, state, lam=0.8):
    """Algorithm 1, lines 4 and 5 in order (line 5 divides by the p_z just updated in line 4)."""
    new = {k: list(v) for k, v in state.items()}
    for i in range(len(ys[0])):
        col = [row[i] for row in ys]
        for z in (0, 1):
            post = [(p1(y) if z == 1 else 1 - p1(y)) for y in col]
            new[f"p{z}"][i] = lam * state[f"p{z}"][i] + (1 - lam) * sum(post) / len(col)
            new[f"mu{z}"][i] = lam * state[f"mu{z}"][i] + (1 - lam) * sum(
                q / new[f"p{z}"][i] * y for q, y in zip(post, col)) / len(col)
    return new


def test_penalty_at_initialisation_matches_hand_computation():
    y = torch.tensor(Y, dtype=torch.float64)
    s = initial_state(2, "cpu", torch.float64)
    assert shade_penalty(y, s["mu0"], s["mu1"]).item() == pytest.approx(hand_penalty(Y, [-1, -1], [1, 1]), rel=1e-12)


def test_two_steps_of_algorithm_1_match_hand_computation():
    y = torch.tensor(Y, dtype=torch.float64)
    state = initial_state(2, "cpu", torch.float64)
    hand = {"p0": [0.5, 0.5], "p1": [0.5, 0.5], "mu0": [-1.0, -1.0], "mu1": [1.0, 1.0]}
    for ys in (Y, [[v * 0.5 - 0.2 for v in row] for row in Y]):
        update_moving_averages(torch.tensor(ys, dtype=torch.float64), state, 0.8)
        hand = hand_update(ys, hand)
        for key in hand:
            assert state[key].tolist() == pytest.approx(hand[key], rel=1e-12), key
    # and the loss then uses the updated averages
    assert shade_penalty(y, state["mu0"], state["mu1"]).item() == pytest.approx(
        hand_penalty(Y, hand["mu0"], hand["mu1"]), rel=1e-12)


def test_conv_units_are_channels_with_positions_as_samples():
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cols = units_as_columns(y)
    assert cols.shape == (2 * 16, 3)
    assert torch.equal(cols[:, 1].sort().values, y[:, 1].flatten().sort().values)


def test_method_loss_gradient_and_update_order():
    """loss uses the averages as they were; after_step updates them; μ carries no gradient."""
    method = SHADE({"weight": 0.1})
    assert attached(method, "mlp") == ["act1<input", "act2<input"]  # pre-activations of every ReLU
    y = torch.tensor(Y, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, 2, dtype=torch.float64)  # y = 0: p(Z=1|y) = 0, term (0 − μ0)² = 1 per unit
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1<input": y, "act2<input": zero})
    loss = method.loss(step)
    assert loss.item() == pytest.approx(0.1 * (hand_penalty(Y, [-1, -1], [1, 1]) + 2.0), rel=1e-6)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    method.after_step(step)
    hand = hand_update(Y, {"p0": [0.5, 0.5], "p1": [0.5, 0.5], "mu0": [-1.0, -1.0], "mu1": [1.0, 1.0]})
    assert method.state["act1<input"]["mu1"].tolist() == pytest.approx(hand["mu1"], rel=1e-6)
    restored = SHADE()
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.state["act1<input"]["mu0"], method.state["act1<input"]["mu0"])


@pytest.mark.parametrize("bad", [{"weight": -1.0}, {"momentum": 1.0}, {"momentum": -0.1}])
def test_invalid_hparams_are_rejected(bad):
    with pytest.raises(HparamError):
        SHADE(bad)
