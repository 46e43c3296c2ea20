"""SHADE: SHAnnon DEcay (Blot, Robert, Thome, Cord, "SHADE: Information-Based Regularization for Deep Learning",
ICIP 2018).

Sec. 2.3: for each unit i of each layer l, with pre-ReLU value y and a Bernoulli latent Z ("pattern present"),

    p(Z=1 | y) = 1 − exp(−ReLU(y)),   p(Z=0 | y) = exp(−ReLU(y))
    Ω_SHADE   = Σ_l Σ_i (1/K) Σ_k Σ_z p(Z_{l,i}=z | y_k) · (y_k − μ_{z,l,i})²      (the eq. 4-5 estimate)
    L         = L_task + weight · Ω_SHADE                                          (eq. 1, the paper's β)

and Algorithm 1 keeps per-unit moving averages, updated after each batch with momentum λ = 0.8:

    line 4:  p_z ← λ p_z + (1−λ)(1/K) Σ_k p(z | y_k)
    line 5:  μ_z ← λ μ_z + (1−λ)(1/K) Σ_k [p(z | y_k) / p_z] y_k     (p_z: the value just updated in line 4)

Choices (docs/methods.md §2.3-2.4): μ_z are constants in the loss (the paper: they "have no influence
on the entropy"); p(z|y) keeps its gradient unless ``detach_posterior``; mean over samples, then ``reduction="sum"``
over units (the paper's Σ_i) or ``"mean"`` over each layer's units, and a sum over layers; a convolutional unit is a
channel whose spatial positions are extra samples (the paper's "half as many parameters as batch normalization");
the averages are updated after backward, in training mode only. SHADE uses no labels.

How it is computed. The paper calls the cost "almost negligible"; a per-op autograd version measured +124 % step
time on cnn1d, so the penalty is one ``torch.autograd.Function`` (``ShadePenalty``) over all hooked layers, working
in the tensors' native layout (per-channel state broadcast along dim 1, no transpose copy). With e = p(Z=0|y) =
exp(−ReLU(y)), d = μ1 − μ0, c = (μ0 + μ1)/2 and the centred value x = y − μ1, one sample's term is

    e (y − μ0)² + (1 − e)(y − μ1)² = (y − μ1)² + 2 d e (y − c) = x² + 2 d e x + d² e,

so Ω needs per channel only Σe, Σx, Σe·x and per layer Σx²; the same sums give Algorithm 1's batch means
(mean e, mean e·y = mean e·x + μ1 mean e, mean (1−e)·y = mean (x − e·x) + μ1 (1 − mean e)), so ``after_step`` is
an O(units) update of four flat registered buffers (``ShadeAverages``). Centring on μ1 keeps float32 sums accurate
when |y| ≫ its spread. The derivative is closed-form,

    ½ ∂/∂y = (y − μ0) − d · 1[y>0] · (1 − e (1 + c − y))          (= x + d·e with ``detach_posterior``),

checked against autograd and ``torch.autograd.gradcheck`` in the tests. The forward leaves q = 1[y>0](1 − e(1 + c −
y)) − 1 so that the backward is a single fused x − d·q.

On CUDA (``kernel_for``) the same sums come from ``shade_triton``: one Triton read of each activation forward (four
per-channel partial sums, no activation-sized workspace) and one read + one write backward (e recomputed): 3
activation-sized memory passes per layer where the code above makes ~30 (13 ops forward, 2 backward, most of them
read-modify-write). Equal to this reference to 1e-6 (float32) and 1e-12 (float64): values, gradients and Algorithm
1's averages (tests/test_shade_triton.py, under Triton's interpreter). This reference stays the CPU path: Triton has
no CPU compiler, and the same recompute formulation written in eager torch is slower on the CPU: without a compiler
every expression is a pass of its own, while this code reuses its workspaces.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from regbench.errors import HparamError

from .base import Method, StepContext, check_range

REDUCTIONS = ("sum", "mean")


def unit_dims(y: Tensor) -> tuple[int, ...]:
    """The sample dimensions of y [B, units, *positions]: everything but dim 1 (channels are the units)."""
    return (0,) + tuple(range(2, y.dim()))


def _per_unit(v: Tensor, y: Tensor) -> Tensor:
    """A [C] vector as a view that broadcasts along dim 1 of y."""
    return v.view((-1,) + (1,) * (y.dim() - 2))


# ---- the moving averages: registered buffers ---------------------------------------------------------------------
class ShadeAverages(nn.Module):
    """Algorithm 1's state for every unit of every hooked layer, in hook order: four flat buffers p0, p1, mu0, mu1.

    A small module the method owns (never part of the model, so the model's state_dict is untouched); ``view(key)``
    gives one layer's slices. Initial values are Algorithm 1 line 1: μ0 = −1, μ1 = 1, p0 = p1 = 0.5.
    """

    def __init__(self, keys: list[str], units: list[int], device=None, dtype=torch.float32):
        super().__init__()
        self.keys, self.units = list(keys), [int(u) for u in units]
        self.offsets = [sum(self.units[:i]) for i in range(len(self.units) + 1)]
        total = self.offsets[-1]
        for name, value in (("p0", 0.5), ("p1", 0.5), ("mu0", -1.0), ("mu1", 1.0)):
            self.register_buffer(name, torch.full((total,), value, device=device, dtype=dtype))

    def view(self, key: str) -> dict[str, Tensor]:
        i = self.keys.index(key)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return {name: buf[lo:hi] for name, buf in self.named_buffers()}

    @torch.no_grad()
    def update(self, mean_p0: Tensor, mean_p0_y: Tensor, mean_p1_y: Tensor, momentum: float) -> None:
        """Algorithm 1 lines 4-5 for all units at once, from the batch means of p(Z=0|y), p(Z=0|y)·y and
        p(Z=1|y)·y per unit. Line 5 divides by the p_z just updated in line 4.

        A unit that stays dead (y ≤ 0 on every batch) drives p1 geometrically to 0 while its line-5 numerator is
        exactly 0; the quotient is then taken as 0 (its limit for any positive p1), never 0/0.
        """
        w, tiny = 1.0 - momentum, torch.finfo(self.p0.dtype).tiny
        self.p0.lerp_(mean_p0.to(self.p0.dtype), w)                              # line 4, z = 0
        self.mu0.lerp_(mean_p0_y.to(self.p0.dtype) / self.p0.clamp_min(tiny), w)  # line 5, z = 0
        self.p1.lerp_(1.0 - mean_p0.to(self.p0.dtype), w)                        # line 4, z = 1
        self.mu1.lerp_(mean_p1_y.to(self.p0.dtype) / self.p1.clamp_min(tiny), w)  # line 5, z = 1


# ---- the fused penalty ---------------------------------------------------------------------------------------------
class _Layer:
    """One hooked layer's cached views and constants for one activation shape."""

    __slots__ = ("d", "dims", "e", "h", "mu1", "q", "s_e", "s_ex", "s_x", "scale", "sum_sq", "x")


class _Plan:
    """What ``ShadePenalty`` needs besides the activations: a snapshot of the averages, the scale, and where to leave
    the per-unit sums for ``after_step``. Everything that depends only on the activations' shapes (per-layer views of
    the per-unit vectors, sample counts, reduction dims) is built once and reused, so a step pays for the elementwise
    work only. On the CPU the activation-sized workspaces persist between steps too: a fresh tensor each step costs
    page faults there (measured); elsewhere the caching allocator makes that moot."""

    def __init__(self, averages: ShadeAverages, weight: float, reduction: str, detach_posterior: bool,
                 fused: bool = False):
        self.averages, self.weight, self.reduction = averages, float(weight), reduction
        self.detach_posterior, self.fused = detach_posterior, fused  # fused: shade_triton's buffers, no workspaces
        self.omega: Tensor | None = None  # Ω (without the weight) of the last forward
        self.sums: Tensor | None = None   # [3, U]: Σe, Σx, Σe·x per unit of the last forward (x = y − μ1)
        self._signature = None

    def prepare(self, ys) -> tuple[torch.dtype, list[_Layer]]:
        calc = torch.float64 if any(y.dtype == torch.float64 for y in ys) else torch.float32
        signature = (tuple((y.shape, y.stride(), y.dtype) for y in ys), ys[0].device, calc)
        if signature != self._signature:
            self._build(ys, ys[0].device, calc)
            self._signature = signature
        # In place, so that a graph built before this step sees the version change and refuses a stale backward.
        self.mu0.copy_(self.averages.mu0)
        self.mu1.copy_(self.averages.mu1)
        torch.sub(self.mu1, self.mu0, out=self.d)
        torch.mul(self.d, -0.5, out=self.h).add_(1.0)  # h = 1 − d/2 = 1 + c − μ1
        return calc, self.layers

    def _build(self, ys, device, calc):
        offsets, total = self.averages.offsets, self.averages.offsets[-1]
        new = lambda *shape: torch.zeros(shape, device=device, dtype=calc)
        self.mu0, self.mu1, self.d, self.h = (new(total) for _ in range(4))
        self.sums, self.sum_sq = new(3, total), new(len(ys))
        if self.fused:  # [R, 4, U] partial sums of the forward kernel and their totals Σe, Σx, Σe·x, Σx² per unit
            from .shade_triton import chunks  # noqa: PLC0415 (CUDA path only)
            self.partials, self.sums4 = new(chunks(ys), 4, total), new(4, total)
            self.sums = self.sums4[:3]
        self.counts, self.unit_scale, self.layer_scale = new(total), new(total), new(len(ys))
        persistent = device.type == "cpu" and not self.fused
        self.layers = []
        for i, y in enumerate(ys):
            lo, hi = offsets[i], offsets[i + 1]
            units = int(y.shape[1])
            k = y.numel() // units
            w = (1.0 if self.reduction == "sum" else 1.0 / units) / k  # mean over samples; sum or mean over units
            self.counts[lo:hi], self.unit_scale[lo:hi], self.layer_scale[i] = k, w, w
            layer = _Layer()
            layer.dims, layer.scale = unit_dims(y), 2.0 * self.weight * w
            layer.d, layer.h, layer.mu1 = (_per_unit(v[lo:hi], y) for v in (self.d, self.h, self.mu1))
            layer.s_e, layer.s_x, layer.s_ex = self.sums[0, lo:hi], self.sums[1, lo:hi], self.sums[2, lo:hi]
            layer.sum_sq = self.sum_sq[i]
            layer.x = layer.e = layer.q = None
            if persistent:
                # y's own memory format (channels_last images stay so): mixed layouts are slow, and the gradient
                # must match what the rest of the backward uses (a 20× slower batch-norm backward, measured)
                layer.x, layer.e, layer.q = (torch.empty_like(y, dtype=calc) for _ in range(3))
            self.layers.append(layer)

    def penalty(self) -> Tensor:
        """Ω = Σ_layers (w/K) Σx² + Σ_units (w/K)(2d Σe·x + d² Σe)   (w = 1, or 1/units for reduction="mean")."""
        s_e, _, s_ex = self.sums.unbind(0)
        per_unit = torch.addcmul(s_ex.mul(2.0), self.d, s_e).mul_(self.d)
        if self.fused:  # Σx² per unit; w is the same for every unit of a layer, so Σ_units w Σx² = the layer term
            return torch.dot(per_unit.add_(self.sums4[3]), self.unit_scale)
        return torch.dot(per_unit, self.unit_scale) + torch.dot(self.layer_scale, self.sum_sq.square())

    def batch_means(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per unit: mean p(Z=0|y), mean p(Z=0|y)·y and mean p(Z=1|y)·y of the last forward (Algorithm 1's inputs)."""
        s_e, s_x, s_ex = self.sums.unbind(0)
        mean_e = s_e / self.counts
        mean_e_y = torch.addcmul(s_ex / self.counts, self.mu1, mean_e)                    # mean e·x + μ1 mean e
        mean_p1_y = torch.addcmul((s_x - s_ex) / self.counts, self.mu1, 1.0 - mean_e)     # + μ1 (1 − mean e)
        return mean_e, mean_e_y, mean_p1_y


class ShadePenalty(torch.autograd.Function):
    """weight · Ω_SHADE over the layers' pre-activations ``ys`` (each [B, C, *positions] or [B, C]).

    Forward, per layer: x = y − μ1, e = exp(−ReLU(y)), the per-channel sums Σe, Σx, Σe·x (left in ``plan.sums``)
    and Σx², from which Ω follows; when y needs a gradient, q = 1[y>0](1 + e·x − (1 − d/2)e) − 1. Backward:
    ∂(weight·Ω)/∂y = scale·(x − d·q), or scale·(x + d·e) with ``detach_posterior``. A second SHADE forward before
    this graph's backward reuses the workspaces and the μ snapshot; the saved-tensor version check then refuses the
    stale backward instead of returning a wrong gradient.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *ys: Tensor) -> Tensor:
        calc, layers = plan.prepare(ys)
        saved, ctx.layers, ctx.dtypes = [], [], []
        for i, (y, L) in enumerate(zip(ys, layers)):
            y = y if y.dtype == calc else y.to(calc)  # bfloat16 under autocast: the sums want float32
            x = torch.sub(y, L.mu1) if L.x is None else torch.sub(y, L.mu1, out=L.x)  # x = y − μ1
            e = torch.empty_like(x) if L.e is None else L.e
            q = torch.empty_like(x) if L.q is None else L.q
            torch.clamp(y, min=0, out=e).neg_().exp_()           # e = p(Z=0|y) = exp(−ReLU(y))
            torch.sum(e, L.dims, out=L.s_e)
            torch.sum(x, L.dims, out=L.s_x)
            torch.sum(torch.mul(e, x, out=q), L.dims, out=L.s_ex)
            torch.linalg.vector_norm(x, out=L.sum_sq)
            if not ctx.needs_input_grad[i + 1]:
                continue
            if plan.detach_posterior:
                saved += [x, e]
            else:
                torch.addcmul(q, e, L.h, value=-1.0, out=q).add_(1.0)              # 1 − e(1 + c − y)
                torch.ops.aten.threshold_backward.grad_input(q, y, 0, grad_input=q)  # × 1[y>0]
                saved += [x, q.sub_(1.0)]
            ctx.layers.append((i, L))
            ctx.dtypes.append(ys[i].dtype)
        plan.omega = plan.penalty()
        ctx.detach_posterior = plan.detach_posterior
        ctx.save_for_backward(plan.mu1, plan.d, *saved)
        return (plan.weight * plan.omega).to(torch.promote_types(calc, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        _mu1, _d, *saved = ctx.saved_tensors  # unpacking checks that no later forward overwrote them
        grads: list[Tensor | None] = [None] * len(ctx.needs_input_grad)
        sign = 1.0 if ctx.detach_posterior else -1.0
        for j, ((i, L), dtype) in enumerate(zip(ctx.layers, ctx.dtypes)):
            g = torch.addcmul(saved[2 * j], saved[2 * j + 1], L.d, value=sign)  # x + d·e, or x − d·q
            g.mul_(grad_output.to(g.dtype) * L.scale)
            grads[i + 1] = g if g.dtype == dtype else g.to(dtype)
        return tuple(grads)


def kernel_for(device) -> str:
    """The penalty's implementation on ``device``: the fused Triton kernels (``shade_triton``: one read of each
    activation forward, one read + one write backward) on CUDA when Triton imports, else ``ShadePenalty``, the
    reference, which is also the CPU path (on the CPU Triton has no compiler backend; its interpreter is for tests)."""
    if torch.device(device).type != "cuda":
        return "torch"
    from .shade_triton import available  # noqa: PLC0415
    return "triton" if available() else "torch"


# ---- the method ----------------------------------------------------------------------------------------------------
class SHADE(Method):
    name = "shade"
    description = "SHAnnon DEcay: conditional-variance bound on each unit's pre-ReLU entropy"
    paper = ("Blot, Robert, Thome, Cord 2018, \"SHADE: Information-Based Regularization for Deep Learning\" (ICIP), "
             "Sec. 2.3 and Algorithm 1")
    defaults = {"weight": 1e-3, "momentum": 0.8, "layers": "all-relu", "detach_posterior": False, "reduction": "sum"}

    @classmethod
    def validate(cls, hp):
        check_range("shade", "weight", hp["weight"], 0)
        check_range("shade", "momentum", hp["momentum"], 0, 1, high_open=True)
        if hp["reduction"] not in REDUCTIONS:
            raise HparamError(f"shade.reduction={hp['reduction']!r} is not one of: {', '.join(REDUCTIONS)}")

    @classmethod
    def search_space(cls, trial):
        # The paper cross-validates β without giving a grid. docs/methods.md §2.5: log-uniform [1e-6, 1e-2] for the
        # default sum over units (Ω is ~10²-10³ on cnn1d/resnet18 at initialisation); momentum stays at 0.8.
        return {"weight": trial.suggest_float("weight", 1e-6, 1e-2, log=True)}

    def attach(self, model, ctx):
        # Pre-ReLU values: the *input* of each ReLU (the engine turns off inplace on captured ReLUs).
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="input")
        self._model = model
        self.averages: ShadeAverages | None = None
        self._plan: _Plan | None = None
        self._pending_update = False
        self._last_penalty = 0.0
        self._omega = None
        self.kernel: str | None = None  # "triton" | "torch"; None: chosen per device at the first loss
        loaded, self._loaded = getattr(self, "_loaded", None), None
        if loaded is not None:
            self.load_state_dict(loaded)

    def _ensure_averages(self, ys: list[Tensor]) -> _Plan:
        units = [int(y.shape[1]) for y in ys]
        if self.averages is None:  # float64 activations (tests) get float64 state; anything else float32
            dtype = torch.float64 if ys[0].dtype == torch.float64 else torch.float32
            self.averages = ShadeAverages(self.keys, units, device=ys[0].device, dtype=dtype)
        elif self.averages.units != units:
            raise ValueError(f"shade: layers {self.keys} have {units} units but the moving averages hold "
                             f"{self.averages.units} (state from another model?)")
        if self.averages.p0.device != ys[0].device:
            self.averages.to(ys[0].device)
            self._plan = None
        if self._plan is None:
            hp = self.hparams
            kernel = self.kernel or kernel_for(ys[0].device)
            self._plan = _Plan(self.averages, hp["weight"], hp["reduction"], hp["detach_posterior"],
                               fused=kernel == "triton")
        return self._plan

    def loss(self, step: StepContext):
        if not self.keys:
            return None
        ys = [step.activations[key] for key in self.keys]
        plan = self._ensure_averages(ys)
        if plan.fused:
            from .shade_triton import TritonShadePenalty  # noqa: PLC0415 (CUDA path)
            total = TritonShadePenalty.apply(plan, *ys)
        else:
            total = ShadePenalty.apply(plan, *ys)
        self._omega = plan.omega
        # Algorithm 1 runs on training batches only: no update when the model is in eval mode.
        self._pending_update = self._model is None or self._model.training
        return total

    def after_step(self, step: StepContext):
        if self._pending_update and self._plan is not None and self._plan.sums is not None:
            self.averages.update(*self._plan.batch_means(), self.hparams["momentum"])
        self._pending_update = False
        if self._omega is not None:
            self._last_penalty = self._omega  # a tensor: read back once per epoch, no per-step host sync

    def diagnostics(self):
        out = {"shade_omega": float(self._last_penalty)}
        if self._plan is not None and self._plan.fused:  # which kernel ran, recorded when it is not the reference
            out["shade_triton"] = 1.0
        return out

    def detach(self, model):
        self._model = None

    def state_dict(self):
        if getattr(self, "averages", None) is None:
            return dict(self._loaded) if getattr(self, "_loaded", None) else {}
        return {"keys": list(self.averages.keys), "units": list(self.averages.units),
                **{k: v.detach().clone() for k, v in self.averages.state_dict().items()}}

    def load_state_dict(self, state):
        if not state:
            return
        if getattr(self, "keys", None) is None:  # not attached yet: keep it for attach
            self._loaded = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
            return
        if list(state["keys"]) != list(self.keys):
            raise ValueError(f"shade: saved state is for layers {state['keys']}, this run hooks {self.keys}")
        device = self.averages.p0.device if self.averages is not None else state["p0"].device
        self.averages = ShadeAverages(state["keys"], state["units"], device=device, dtype=state["p0"].dtype)
        self.averages.load_state_dict({k: state[k] for k in ("p0", "p1", "mu0", "mu1")})
        self._plan = None
