"""DLN entropic prior as a regularizer (Chen, Kotwal, Menon 2025, "Entropic
regularization in the Deep Linear Network", arXiv 2512.06137, with the entropy formula of Menon & Yu, arXiv
2509.09088). Formulas and checks: docs/dln.md.

For a depth-N deep linear network with end-to-end map X (singular values σ), the Boltzmann entropy of the balanced
factorizations of X is (docs/dln.md §2.1; [P1] Thm 4)

    S_N(X) = (N−1) log c_d + ½ log( van(σ²) / van(σ^{2/N}) ),      van(a) = ∏_{i<j} |a_i − a_j|,

and the paper's free energy is F_β = E − β⁻¹ S_N (docs/dln.md §3.1: minimized, so S_N is maximized). In code we drop the
constant and use the collision-safe sum form (docs/dln.md §2.2): with λ_i = σ_i^{2/N},

    S̃_N(σ) = ½ Σ_{i<j} log P_N(λ_i, λ_j),   P_N(a, b) = Σ_{k=0}^{N−1} a^k b^{N−1−k} = (a^N − b^N)/(a − b) > 0,

evaluated as a logsumexp over k of (2/N)(k log σ_i + (N−1−k) log σ_j). It is smooth across σ_i = σ_j (no
singular-value repulsion, so no collision ε), and its gradient ∂S/∂σ_i = Σ_{j≠i}[σ_i/(σ_i²−σ_j²) −
(1/N)σ_i^{2/N−1}/(σ_i^{2/N}−σ_j^{2/N})] (docs/dln.md §2.3) is > 0: the prior pushes every singular value up, and being
concave and symmetric it favours equal singular values at a fixed scale.

The regularizer (docs/dln.md §5(b), a design choice, not the papers' setting) adds

    R = −strength · β⁻¹ · Σ_layers S̃_N(σ(M_l)) / n_l

to the task loss, where M_l and n_l are:

* ``target="each"``: every selected weight matrix (Conv kernels reshaped C_out × C_in·k…) is treated as the
  end-to-end map of a virtual depth-``depth`` factorization. Rectangular m×n uses its min(m, n) singular values,
  an extrapolation [P1]/[P2] do not cover (§5(b)).
* ``target="product"``: the end-to-end product W_L⋯W_1 of the selected nn.Linear layers (in module order, shapes
  must chain), with N = L. Only a literal DLN when nothing nonlinear sits between them; across ReLUs it is simply a
  spectral prior on the product.
* ``normalize`` (n_l, design): S̃_N grows like K log(scale) with K = k(k−1)(N−1)/(2N), quadratic in the width k, so
  one strength cannot suit a 10-wide head and a 512-wide conv. ``"values"`` (default) divides by (k−1)/2: at equal
  singular values S̃_N/n_l = Σ_i [(1−1/N) log σ_i + ½ log N], a per-singular-value log barrier whose push on each σ_i,
  (1−1/N)/σ_i, does not depend on the width (like weight decay's μσ_i). With weight decay (μ/2)‖W‖² the equilibrium is
  then σ_*² = (strength/β)(1−1/N)/μ for every layer width. ``"pairs"`` divides by k(k−1)/2 (mean over pairs: the
  push per σ_i falls like 1/k), ``"none"`` keeps the raw S̃_N of docs/dln.md (equilibrium σ_*² = (strength/β)κ'/μ with
  κ' = (k−1)(N−1)/(2N), §5(b)).

β and strength only enter as strength/β; β is kept to match the paper's F_β, and the search space tunes strength
alone. depth N must be ≥ 2 (N = 1 gives S ≡ 0: no overparametrization, §2.2).

Numerics (docs/dln.md §5(b)): singular values in float64 outside autocast, floored at 1e-12·max σ before the log
(exactly singular matrices keep finite gradients). The gradient U diag(∂S/∂σ) Vᵀ comes from σ_i = u_iᵀ M v_i with the
singular vectors held constant, so a wide matrix needs only R of a QR and its SVD; squaring into a Gram matrix is not
used (it loses singular values below ~1e-8·σ_max).

Cost: weights of equal shape share one batched call for their singular vectors (CPU: QR + SVD; CUDA: the float64
Gram's eigenvectors through ``regbench.spectral.batched_eigh``, no host sync). ``every=k`` (default 5) computes the
penalty on every k-th step only (exact on those steps; strength/k on average, absorbed by the tuned range);
``svd_every=k`` refreshes the singular vectors on every k-th penalty only (stale vectors bias the penalty).
``python benchmarks/method_overhead.py --methods dln_entropy --dln-accuracy`` prints what each choice costs in time and
accuracy on the machine it runs on. Callers that step a flow by hand (the dln_equilibrium suite passes step 0 every
time) get the penalty every call.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from regbench.errors import HparamError

from .base import Method, StepContext, check_range

TARGETS = ("each", "product")
NORMALIZE = ("values", "pairs", "none")
MAX_DEPTH = 64  # memory is O(k² N) per layer: 131k pairs × N float64s for a 512-wide layer


def dln_entropy(s: Tensor, N: int) -> Tensor:
    """S̃_N = S_N − (N−1) log c_d = ½ Σ_{i<j} log P_N(σ_i^{2/N}, σ_j^{2/N}) (docs/dln.md §2.2), the sum form as a
    logsumexp.

    ``s``: (..., k) singular values (≥ 0), batched over the leading dims; returns (...). σ is floored at
    1e-12·max σ (floor not differentiated), so zero singular values give finite values and gradients.
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"dln_entropy: depth N must be an integer ≥ 1, got {N!r}")
    k = s.shape[-1]
    if k < 2:
        return s.sum(-1) * 0  # no pairs: S ≡ 0 (keeps the graph and the batch shape)
    floor = (1e-12 * s.detach().amax(-1, keepdim=True)).clamp_min(torch.finfo(s.dtype).tiny)
    ell = torch.log(torch.where(s > floor, s, floor))
    i, j = torch.triu_indices(k, k, offset=1, device=s.device)
    p = torch.arange(N, dtype=s.dtype, device=s.device)
    a = (2.0 / N) * (p * ell[..., i, None] + (N - 1 - p) * ell[..., j, None])
    return 0.5 * torch.logsumexp(a, dim=-1).sum(-1)


def short_side(m: Tensor) -> Tensor:
    """``m`` in float64 with its short side first (k × n, k ≤ n): the layout ``singular_values`` works on."""
    m = m.double()
    return m if m.shape[-1] >= m.shape[-2] else m.mT


def vector_route(device) -> str:
    """How ``left_vectors`` gets the singular vectors on ``device``: "svd" (QR + SVD, full float64 accuracy; the
    CPU) or "gram" (eigenvectors of the float64 Gram a·aᵀ by ``regbench.spectral.batched_eigh``: CuPy's batched
    solver on CUDA, so no host sync in the step; torch's SVD and QR synchronize on CUDA)."""
    return "gram" if torch.device(device).type == "cuda" else "svd"


@torch.no_grad()
def left_vectors(a: Tensor, route: str | None = None) -> Tensor:
    """The k left singular vectors of a short-side-first ``a`` (..., k, n), as columns, by descending σ; no grad.

    ``route`` (default ``vector_route(a.device)``): "svd" = an SVD, of R from a QR when n ≥ 2k (full accuracy,
    host-synchronizing on CUDA); "gram" = eigenvectors of a·aᵀ (float64), 2.3-4.5× faster on the CPU
    (2×512×4608: 142 vs 642 ms) and sync-free on CUDA with CuPy. On spectra spread from σ_max down to 1e-6·σ_max
    it gives σ_i = ‖aᵀu_i‖ within 1e-10 relative of the SVD route, S̃_N within 1e-9 and the gradient within 1e-5 of
    its largest entry (a vector of a close pair of small σ² is only resolved to eps·σ_max²/gap;
    tests/test_dln_entropy.py). Below ~1e-8·σ_max the Gram cannot resolve them: σ_i off by O(1), S̃_N by 2-3e-4
    relative with four such values in a 64×576 weight. Trained layers are far from that regime."""
    if (route or vector_route(a.device)) == "gram":
        from regbench.spectral import batched_eigh  # noqa: PLC0415
        return batched_eigh(a @ a.mT)[1].flip(-1)  # ascending eigenvalues → descending σ
    if a.shape[-1] >= 2 * a.shape[-2]:  # aᵀ = Q R  ⇒  a aᵀ = Rᵀ R: a's left vectors are R's right ones
        return torch.linalg.svd(torch.linalg.qr(a.mT, mode="r")[1])[2].mT
    return torch.linalg.svd(a, full_matrices=False)[0]


def singular_values(m: Tensor, u: Tensor | None = None) -> Tensor:
    """Float64 singular values of ``m`` (..., rows, cols), min(rows, cols) of them, descending.

    Differentiable, with gradient U diag(g) Vᵀ: the backward of ``torch.linalg.svdvals``, well defined at repeated
    and at zero singular values. The left singular vectors u_i of the short side come from an SVD without grad (of
    the triangular factor of a QR when the matrix is at least twice as long as it is short: same values, less work);
    then p_i = u_iᵀ M is computed with grad and σ_i = p_i · v_i with v_i = p_i/‖p_i‖ held constant (= ‖p_i‖).

    ``u``: left vectors from an earlier SVD (``left_vectors``; ``svd_every`` in DLNEntropy). Then no SVD runs (matmuls
    only, no host sync) and σ_i = ‖Mᵀu_i‖, exact for the matrix those vectors came from and, for a matrix moved by ΔM
    since, in error by O(‖ΔM‖²) (a Rayleigh-type estimate; measured in benchmarks/method_overhead.py --dln-accuracy).
    """
    a = short_side(m)  # short side first: a is k × n, k ≤ n
    if u is None:
        u = left_vectors(a)
    p = u.mT @ a  # row i: σ_i v_iᵀ
    with torch.no_grad():
        length = p.norm(dim=-1, keepdim=True)
        v = torch.where(length > 0, p / length.clamp_min(torch.finfo(p.dtype).tiny), 0.0)
    return (p * v).sum(-1)


def norm_factor(k: int, normalize: str) -> float:
    """n_l: the divisor of a layer's S̃_N for k singular values (module docstring, ``normalize``)."""
    if normalize == "values":
        return (k - 1) / 2
    if normalize == "pairs":
        return k * (k - 1) / 2
    return 1.0


def as_matrix(weight: Tensor) -> Tensor:
    """A Linear weight as is; a Conv kernel C_out × C_in/groups × k… as C_out × (C_in/groups·k…)."""
    return weight.reshape(weight.shape[0], -1)


def current_weight(module: nn.Module) -> Tensor | None:
    """``module.weight`` as the last forward pass used it. A parametrized weight (another method's spectral norm,
    composed with this one) is evaluated with its parametrizations in eval mode, so reading it does not run another
    power iteration on their u, v buffers; their training flags are restored at once."""
    if not parametrize.is_parametrized(module, "weight"):
        return getattr(module, "weight", None)
    parts = list(module.parametrizations["weight"].modules())
    modes = [p.training for p in parts]
    try:
        for p in parts:
            p.training = False
        return module.weight
    finally:
        for p, mode in zip(parts, modes):
            p.training = mode


def matrix_entropy(m: Tensor, N: int, normalize: str = "values") -> Tensor:
    """S̃_N(σ(m)) / n_l for a matrix or a batch of same-shape matrices (..., rows, cols), in float64."""
    k = min(m.shape[-2:])
    return dln_entropy(singular_values(m), N) / norm_factor(k, normalize)


class DLNEntropy(Method):
    name = "dln_entropy"
    description = "DLN entropic prior: −(strength/β)·S_N of each weight matrix's (or the product's) singular values"
    paper = ("Chen, Kotwal, Menon 2025, \"Entropic Regularization in the Deep Linear Network\" (arXiv 2512.06137); "
             "entropy of Menon & Yu 2025 (arXiv 2509.09088)")
    defaults = {"strength": 1e-3, "beta": 1.0, "depth": 3, "layers": "hidden-weights", "target": "each",
                "normalize": "values", "every": 5, "svd_every": 1}

    @classmethod
    def validate(cls, hp):
        check_range("dln_entropy", "strength", hp["strength"], 0)
        check_range("dln_entropy", "beta", hp["beta"], 0, low_open=True)
        depth = hp["depth"]
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise HparamError(f"dln_entropy.depth={depth!r} is not an integer in [2, {MAX_DEPTH}]")
        check_range("dln_entropy", "depth", depth, 2, MAX_DEPTH)
        if hp["target"] not in TARGETS:
            raise HparamError(f"dln_entropy.target={hp['target']!r} is not one of: {', '.join(TARGETS)}")
        if hp["normalize"] not in NORMALIZE:
            raise HparamError(f"dln_entropy.normalize={hp['normalize']!r} is not one of: {', '.join(NORMALIZE)}")
        if not isinstance(hp["layers"], str) or not hp["layers"]:
            raise HparamError(f"dln_entropy.layers={hp['layers']!r} is not a layer rule (e.g. hidden-weights, "
                              "weights, linear, name:GLOB)")
        for key in ("every", "svd_every"):
            if isinstance(hp[key], bool) or not isinstance(hp[key], int):
                raise HparamError(f"dln_entropy.{key}={hp[key]!r} is not an integer ≥ 1")
            check_range("dln_entropy", key, hp[key], 1)

    @classmethod
    def search_space(cls, trial):
        # Only strength/β matters, so β stays at 1 and strength is searched on a log scale around the default
        # (per-σ push strength·(1−1/N)/σ with normalize="values"); depth changes the (1−1/N) factor and how strongly
        # unequal singular values are coupled. target stays "each": "product" needs chaining Linear layers.
        return {
            "strength": trial.suggest_float("strength", 1e-5, 1e-1, log=True),
            "depth": trial.suggest_int("depth", 2, 8),
            "layers": trial.suggest_categorical("layers", ["hidden-weights", "weights"]),
        }

    def attach(self, model, ctx):
        rule, target = self.hparams["layers"], self.hparams["target"]
        seen, layers = set(), []
        for name, module in ctx.select_layers(rule):
            weight = current_weight(module)
            if isinstance(weight, Tensor) and weight.dim() >= 2 and id(module) not in seen:
                seen.add(id(module))
                layers.append((name, module))
        if not layers:
            raise HparamError(f"dln_entropy.layers={rule!r} selects no module with a weight matrix; use e.g. "
                              "hidden-weights, weights, linear or name:GLOB")
        if target == "product":
            self._check_chain(layers)
            self.groups = [[name for name, _ in layers]]
        else:
            layers = [(n, m) for n, m in layers if min(as_matrix(current_weight(m)).shape) >= 2]
            if not layers:
                raise HparamError(f"dln_entropy.layers={rule!r} selects only weights with a single row or column, "
                                  "whose entropy is constant; choose wider layers")
            by_shape: dict[tuple, list[str]] = {}
            for name, module in layers:  # same-shape weights share one batched SVD
                by_shape.setdefault(tuple(as_matrix(current_weight(module)).shape), []).append(name)
            self.groups = list(by_shape.values())
        self.modules = dict(layers)
        self._vectors: dict[int, Tensor] = {}  # group → its left singular vectors from the last SVD
        self._computed = 0                     # penalties computed so far (the SVD is refreshed every svd_every)
        self._pending: dict[str, Tensor] = {}
        self.last_entropy: dict[str, Tensor] = {}

    def _check_chain(self, layers):
        rule = self.hparams["layers"]
        head = f"dln_entropy.target='product' with layers={rule!r}"
        bad = [n for n, m in layers if not isinstance(m, nn.Linear)]
        if bad:
            raise HparamError(f"{head}: {bad[0]} is a {type(dict(layers)[bad[0]]).__name__}, not nn.Linear; the "
                              "product needs consecutive Linear layers (e.g. layers=linear on an MLP)")
        if len(layers) < 2:
            raise HparamError(f"{head} selects 1 Linear layer; the product needs at least 2 (N = their number)")
        for (n0, m0), (n1, m1) in itertools.pairwise(layers):
            if m1.in_features != m0.out_features:
                raise HparamError(f"{head}: shapes do not chain, {n1}.in_features={m1.in_features} but "
                                  f"{n0}.out_features={m0.out_features}")
        if min(layers[-1][1].out_features, layers[0][1].in_features) < 2:
            raise HparamError(f"{head}: the product is {layers[-1][1].out_features} × {layers[0][1].in_features}, "
                              "a single row or column, whose entropy is constant")

    def wants_activations(self, step: int) -> bool:
        return False

    def _sigma(self, group: int, m: Tensor, refresh: bool) -> Tensor:
        """σ of ``m`` (a batch of equal-shape weights: ONE batched QR + SVD), or from the group's stored vectors."""
        a = short_side(m)
        u = self._vectors.get(group)
        if refresh or u is None or u.shape[:-1] != a.shape[:-1] or u.device != a.device:
            u = self._vectors[group] = left_vectors(a)
        return singular_values(a, u)

    def state_dict(self):
        """The SVD schedule (penalties computed) and the stored singular vectors: a resumed run continues exactly."""
        vectors = getattr(self, "_vectors", {})
        return {"computed": getattr(self, "_computed", 0),
                "vectors": [vectors.get(g) for g in range(len(getattr(self, "groups", [])))]} if vectors else {}

    def load_state_dict(self, state):
        if state:
            self._computed = int(state["computed"])
            self._vectors = {g: u for g, u in enumerate(state["vectors"]) if u is not None}

    def entropies(self, refresh: bool = True) -> dict[str, Tensor]:
        """{layer (or 'a*b*c' for the product): S̃_N/n_l}, float64, differentiable w.r.t. the weights.

        ``refresh``: recompute the singular vectors (an SVD per group of equal-shape weights); otherwise reuse the
        last ones (matmuls only; σ_i = ‖Mᵀu_i‖, see ``singular_values``)."""
        N, normalize = self.hparams["depth"], self.hparams["normalize"]
        out: dict[str, Tensor] = {}
        if self.hparams["target"] == "product":
            names = self.groups[0]
            x = current_weight(self.modules[names[0]]).double()
            for name in names[1:]:
                x = current_weight(self.modules[name]).double() @ x
            k = min(x.shape)
            values = dln_entropy(self._sigma(0, x, refresh), len(names)) / norm_factor(k, normalize)
            out["*".join(reversed(names))] = values
            return out
        for g, names in enumerate(self.groups):
            batch = torch.stack([as_matrix(current_weight(self.modules[n])) for n in names])
            k = min(batch.shape[-2:])
            values = dln_entropy(self._sigma(g, batch, refresh), N) / norm_factor(k, normalize)
            out.update(zip(names, values.unbind(0)))
        return out

    def loss(self, step: StepContext):
        self._pending = {}
        if step.step % self.hparams["every"]:
            return None
        device = step.task_loss.device
        with torch.autocast(device_type=device.type, enabled=False):
            entropies = self.entropies(refresh=self._computed % self.hparams["svd_every"] == 0)
            self._computed += 1
            total = torch.stack(list(entropies.values())).sum()
            penalty = -(self.hparams["strength"] / self.hparams["beta"]) * total
        self._pending = {k: v.detach() for k, v in entropies.items()}
        return penalty.to(step.task_loss.dtype)

    def after_step(self, step):
        if self._pending:
            self.last_entropy = dict(self._pending)  # read back once per epoch in diagnostics(): no per-step sync

    def diagnostics(self):
        if not self.last_entropy:
            return {}
        return {"dln_entropy/total": float(torch.stack(list(self.last_entropy.values())).sum())}
