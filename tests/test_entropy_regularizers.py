"""label_smoothing, confidence_penalty, decov, vicreg_reg against closed forms and hand computations on tiny inputs,
then one real engine step each."""
import math

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from helpers import attached
from regbench import engine, models
from regbench.errors import HparamError
from regbench.methods.base import StepContext
from regbench.methods.composite import compose
from regbench.methods.confidence_penalty import ConfidencePenalty, prediction_entropy
from regbench.methods.decov import DeCov, decov_penalty
from regbench.methods.label_smoothing import LabelSmoothing
from regbench.methods.vicreg_reg import VICRegReg, covariance_term, variance_term

H = [[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]]  # 3 samples × 2 features; centred columns [-1, 1, 0] and [0, -2, 2]


def logits_step(logits, targets=None):
    targets = torch.zeros(len(logits), dtype=torch.long) if targets is None else targets
    return StepContext(inputs=None, targets=targets, logits=logits,
                       task_loss=F.cross_entropy(logits, targets))


def attached_with(method, num_classes, model_name="mlp", input_shape=(4,)):
    """Like helpers.attached, for a chosen number of classes (the confidence penalty's Γ depends on K)."""
    model = models.create_model(model_name, num_classes, input_shape)
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, num_classes, input_shape))
    return capture.keys()


def space(cls):
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = cls.search_space(trial)
    assert set(values) <= set(cls.defaults) and set(values) == set(trial.distributions)
    cls(values)  # every suggestion is a valid hparam set
    return trial.distributions


# ---- label smoothing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3, 1.0])
def test_label_smoothing_task_plus_term_is_torch_smoothed_ce(eps):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(16, 7, generator=g)).requires_grad_()
    y = torch.randint(0, 7, (16,), generator=g)
    step = logits_step(logits, y)
    total = step.task_loss + LabelSmoothing({"eps": eps}).loss(step)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, y, label_smoothing=eps)
    assert total.item() == pytest.approx(ref.item(), abs=1e-6)
    total.backward()
    ref.backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-7)


def test_label_smoothing_hand_example():
    # p = (1/4, 3/4), y = 0: CE = ln 4, mean_k(−log p_k) = (ln 4 + ln 4/3)/2, so the term is −ε·ln(3)/2.
    step = logits_step(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    assert LabelSmoothing({"eps": 0.2}).loss(step).item() == pytest.approx(-0.2 * math.log(3) / 2, rel=1e-12)
    uniform = logits_step(torch.zeros(2, 5, dtype=torch.float64))  # p uniform: smoothing changes nothing
    assert LabelSmoothing({"eps": 0.3}).loss(uniform).item() == pytest.approx(0.0, abs=1e-15)
    assert LabelSmoothing({"eps": 0.0}).loss(uniform) is None


# ---- confidence penalty ------------------------------------------------------------------------------------------

CP_LOGITS = [[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0)]]  # p = (1/3,1/3,1/3) and (1/6, 2/6, 3/6)
H_ROWS = [math.log(3.0), math.log(6.0) / 6 + math.log(3.0) / 3 + math.log(2.0) / 2]  # their entropies, by hand


def test_confidence_penalty_plain_matches_hand_entropies():
    logits = torch.tensor(CP_LOGITS, dtype=torch.float64)
    assert prediction_entropy(logits).tolist() == pytest.approx(H_ROWS, rel=1e-12)
    method = ConfidencePenalty({"beta": 0.5})
    attached_with(method, 3)
    assert method.loss(logits_step(logits)).item() == pytest.approx(-0.5 * sum(H_ROWS) / 2, rel=1e-12)


def test_confidence_penalty_hinge_uses_fraction_of_log_k():
    logits = torch.tensor(CP_LOGITS, dtype=torch.float64)
    method = ConfidencePenalty({"beta": 0.5, "threshold_frac": 0.95})
    attached_with(method, 3)
    gamma = 0.95 * math.log(3)  # 1.0437: above row 2's entropy (1.0114), below row 1's (1.0986)
    expected = 0.5 * (max(0.0, gamma - H_ROWS[0]) + max(0.0, gamma - H_ROWS[1])) / 2
    assert expected > 0
    assert method.loss(logits_step(logits)).item() == pytest.approx(expected, rel=1e-12)
    method.after_step(None)
    assert method.diagnostics()["confidence_entropy"] == pytest.approx(sum(H_ROWS) / 2, rel=1e-6)


def test_confidence_penalty_gradient_closed_form_and_full_hinge():
    # dH/dz_k = −p_k (log p_k + H); with threshold_frac = 1 the hinge is always active (H ≤ log K): same gradient.
    g = torch.Generator().manual_seed(1)
    z = (2 * torch.randn(4, 10, generator=g, dtype=torch.float64)).requires_grad_()
    plain = ConfidencePenalty({"beta": 0.3})
    full = ConfidencePenalty({"beta": 0.3, "threshold_frac": 1.0})
    attached_with(plain, 10)
    attached_with(full, 10)
    (grad_plain,) = torch.autograd.grad(plain.loss(logits_step(z)), z)
    (grad_full,) = torch.autograd.grad(full.loss(logits_step(z)), z)
    p = z.detach().softmax(dim=1)
    h = -(p * p.log()).sum(dim=1, keepdim=True)
    expected = -0.3 * (-p * (p.log() + h)) / 4
    assert torch.allclose(grad_plain, expected, atol=1e-12)
    assert torch.allclose(grad_full, expected, atol=1e-12)
    assert full.loss(logits_step(z)).item() == pytest.approx(plain.loss(logits_step(z)).item() + 0.3 * math.log(10))


def test_confidence_penalty_saturated_logits_stay_finite():
    z = torch.tensor([[1000.0, 0.0, -1000.0]], requires_grad=True)
    method = ConfidencePenalty({"beta": 1.0})
    attached_with(method, 3)
    loss = method.loss(logits_step(z))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


# ---- DeCov -------------------------------------------------------------------------------------------------------

def test_decov_hand_example():
    # C = (1/3)·[[2, −2], [−2, 8]]: off-diagonal C_12 = −2/3, so ½(‖C‖_F² − ‖diag C‖²) = C_12² = 4/9.
    assert decov_penalty(torch.tensor(H, dtype=torch.float64)).item() == pytest.approx(4 / 9, rel=1e-12)


def test_decov_equals_paper_formula_with_torch_cov_and_scales_as_fourth_power():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(32, 6, generator=g, dtype=torch.float64).relu().requires_grad_()
    mine = decov_penalty(h)
    c = torch.cov(h.T, correction=0)  # an independent covariance: 1/N, as in the paper
    paper = 0.5 * (c.pow(2).sum() - c.diagonal().pow(2).sum())
    assert mine.item() == pytest.approx(paper.item(), rel=1e-10)
    assert torch.allclose(torch.autograd.grad(mine, h)[0], torch.autograd.grad(paper, h)[0], atol=1e-12)
    # the scale pitfall: shrinking the activations 2× shrinks the penalty 16×
    assert decov_penalty(h.detach() / 2).item() == pytest.approx(mine.item() / 16, rel=1e-10)


def test_decov_method_sums_layers_pools_conv_maps_and_logs_norms():
    method = DeCov({"weight": 0.5, "layers": "all"})
    assert attached(method, "mlp") == ["act1", "act2"]
    h = torch.tensor(H, dtype=torch.float64)
    conv = h[:, :, None, None] + torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64)  # GAP gives back h
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None,
                       activations={"act1": h, "act2": conv})
    assert method.loss(step).item() == pytest.approx(0.5 * 2 * 4 / 9, rel=1e-12)
    assert method.diagnostics() == {}  # nothing committed before after_step
    method.after_step(step)
    diag = method.diagnostics()
    assert diag["decov/act1"] == pytest.approx(4 / 9) and diag["decov/act2"] == pytest.approx(4 / 9)
    assert diag["decov_act_rms/act1"] == pytest.approx(math.sqrt(34 / 6))  # sqrt(mean h²) of H


# ---- VICReg variance + covariance ------------------------------------------------------------------------------------

def numpy_vicreg(z, gamma=1.0, eps=1e-4):
    """Plain numpy rewrite: v = mean_j max(0, γ − sqrt(var_j + ε)), c = Σ_{i≠j} C_ij² / d with np.cov (n − 1)."""
    std = np.sqrt(z.var(axis=0, ddof=1) + eps)
    cov = np.cov(z, rowvar=False)
    return np.maximum(0.0, gamma - std).mean(), (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / z.shape[1]


def test_vicreg_hand_example():
    # unbiased variances 1 and 4; C_12 = (−2)/(n−1) = −1, so c = (1/d)·2·1 = 1.
    z = torch.tensor(H, dtype=torch.float64)
    assert covariance_term(z).item() == pytest.approx(1.0, rel=1e-12)
    # γ = 1.5: only feature 1 (std ≈ 1) is under the floor; feature 2 (std ≈ 2) is not
    assert variance_term(z, gamma=1.5).item() == pytest.approx((1.5 - math.sqrt(1 + 1e-4)) / 2, rel=1e-12)
    assert variance_term(z, gamma=1.0).item() == 0.0


def test_vicreg_matches_numpy_rewrite_and_gradcheck():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=[0.1, 0.3, 0.8, 1.5, 2.0], size=(20, 5)) + 0.5 * rng.normal(size=(20, 1))  # correlated
    v_ref, c_ref = numpy_vicreg(z)
    zt = torch.tensor(z, requires_grad=True)
    assert variance_term(zt).item() == pytest.approx(v_ref, rel=1e-12) and v_ref > 0
    assert covariance_term(zt).item() == pytest.approx(c_ref, rel=1e-12) and c_ref > 0
    assert torch.autograd.gradcheck(lambda t: variance_term(t) + covariance_term(t), (zt,))


def test_vicreg_method_weights_terms_and_logs_them():
    method = VICRegReg({"var_weight": 0.2, "cov_weight": 0.7, "gamma": 1.5})
    assert attached(method, "cnn", (1, 8, 8)) == ["pool"]
    z = torch.tensor(H, dtype=torch.float64)
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None, activations={"pool": z})
    v = (1.5 - math.sqrt(1 + 1e-4)) / 2
    assert method.loss(step).item() == pytest.approx(0.2 * v + 0.7 * 1.0, rel=1e-12)
    method.after_step(step)
    assert method.diagnostics() == pytest.approx({"vicreg_var/pool": v, "vicreg_cov/pool": 1.0})


# ---- hparams, search spaces, real engine steps ------------------------------------------------------------------

@pytest.mark.parametrize("cls, hparams, message", [
    (LabelSmoothing, {"eps": 1.5}, "label_smoothing.eps=1.5 is outside [0, 1]"),
    (ConfidencePenalty, {"beta": -0.1}, "confidence_penalty.beta=-0.1 is outside [0, inf)"),
    (ConfidencePenalty, {"threshold_frac": 2.0}, "confidence_penalty.threshold_frac=2.0 is outside [0, 1]"),
    (DeCov, {"weight": -1.0}, "decov.weight=-1.0 is outside [0, inf)"),
    (VICRegReg, {"gamma": 0.0}, "vicreg_reg.gamma=0.0 is outside (0, inf)"),
    (VICRegReg, {"cov_weight": "-2"}, "vicreg_reg.cov_weight=-2.0 is outside [0, inf)"),
])
def test_bad_hparams_one_line(cls, hparams, message):
    with pytest.raises(HparamError) as err:
        cls(hparams)
    assert str(err.value) == message


def test_search_spaces():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ls = space(LabelSmoothing)["eps"]
    assert (ls.low, ls.high) == (0.0, 0.3)
    cp = space(ConfidencePenalty)
    assert (cp["beta"].low, cp["beta"].high, cp["beta"].log) == (0.01, 2.0, True)
    assert 0.0 in cp["threshold_frac"].choices and max(cp["threshold_frac"].choices) < 1
    dc = space(DeCov)["weight"]
    assert (dc.low, dc.high, dc.log) == (1e-4, 10.0, True)
    vr = space(VICRegReg)
    assert (vr["var_weight"].low, vr["var_weight"].high, vr["var_weight"].log) == (1e-3, 1.0, True)
    assert (vr["cov_weight"].low, vr["cov_weight"].high, vr["cov_weight"].log) == (1e-3, 10.0, True)


@pytest.mark.parametrize("cls", [LabelSmoothing, ConfidencePenalty, DeCov, VICRegReg])
@pytest.mark.parametrize("model_name, shape", [("mlp", (1, 40)), ("cnn", (1, 8, 8)), ("cnn1d", (40,))])
def test_real_train_steps(cls, model_name, shape):
    torch.manual_seed(0)
    method = cls()
    model = models.create_model(model_name, 10, shape, **method.model_options())
    keys_before = list(model.state_dict())
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, shape))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    for step in range(3):
        task, reg = engine.train_step(model, method, capture, opt, x, y, step=step)
        assert torch.isfinite(task) and torch.isfinite(reg) and reg.item() != 0.0
    assert all(math.isfinite(v) for v in method.diagnostics().values())
    method.detach(model)
    capture.remove()
    assert list(model.state_dict()) == keys_before


def test_label_smoothing_engine_total_is_smoothed_ce():
    torch.manual_seed(0)
    model = models.create_model("mlp", 10, (1, 40))
    method = LabelSmoothing({"eps": 0.2})
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, (1, 40)))
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, label_smoothing=0.2)  # the MLP is deterministic in train mode
    task, reg = engine.train_step(model, method, capture, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    assert (task + reg).item() == pytest.approx(expected.item(), abs=1e-6)


def test_composed_decov_and_vicreg_share_one_hook_and_add_up():
    composite = compose([DeCov, VICRegReg])({"decov.weight": 0.5})
    assert attached(composite, "mlp") == ["act2"]  # both ask for the pooled layer: one hook
    z = torch.tensor(H, dtype=torch.float64)
    step = StepContext(inputs=None, targets=None, logits=None, task_loss=None, activations={"act2": z})
    v = 0.0  # default γ = 1: both stds are ≥ 1
    assert composite.loss(step).item() == pytest.approx(0.5 * 4 / 9 + 0.1 * v + 1.0 * 1.0, rel=1e-12)


def test_one_pass_forms_equal_the_textbook_ones():
    """Issue 18 item 5: DeCov's penalty without a d×d mask and its RMS from the covariance, VICReg's variance from
    the covariance diagonal, equal the direct formulas (float64)."""
    from regbench.methods.vicreg_reg import both_terms
    h = torch.relu(torch.randn(64, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.3)
    cov = (h - h.mean(0)).T @ (h - h.mean(0)) / 64
    term, rms = decov_penalty(h, with_rms=True)
    assert term.item() == pytest.approx(0.5 * (cov.square().sum() - cov.diagonal().square().sum()).item(), rel=1e-12)
    assert rms.item() == pytest.approx(h.square().mean().sqrt().item(), rel=1e-12)
    v, c = both_terms(h, 1.0)
    assert v.item() == pytest.approx(variance_term(h, 1.0).item(), rel=1e-12)
    assert c.item() == pytest.approx(covariance_term(h).item(), rel=1e-12)
