"""SES: Spectral Entropy Shaping (D. Le Bone, "Spectral Entropy Shaping (SES): A Novel Regularization Technique for
Neural Networks via Layer-wise Spectral Entropy Control", 2026; eq. 1-6, Sec. 5.2, Listing 1-2).

For each hooked layer l with batch activations H ∈ R^{B×d_l}:

* eq. 1  Σ = (H − H̄)ᵀ(H − H̄)/(B − 1)
* eq. 2  p_i = λ_i / Σ_j λ_j over the eigenvalues of Σ
* eq. 3  H_l = −Σ_i p_i log p_i ∈ [0, log d_l]
* eq. 4  erank_l = exp(H_l)
* eq. 5  R_SES = Σ_l α_l (H_l − β·log d_l)²   (α_l = 1 as in Listing 1; target erank d_l^β)
* eq. 6  L = L_task + λ·R_SES

Implementation (docs/methods.md §1.3-1.7; the batched spectral math is in regbench.spectral):

* ``eigen_path="exact"`` (default): the value of eq. 3 (to 1e-6 in float32), computed fast: each layer's min-side
  Gram (B×B when B < d, §1.4), Grams of equal size in ONE batched eigensolve (P5), autocast off, float32 (float64
  for float64 input), relative zero threshold, NaN-safe p·log p, closed-form gradient dH/dG = V diag(dH/dλ) Vᵀ
  (= −(log ρ + H·I)/tr C, docs/gpu.md §3). The eigensolver is chosen per device (``regbench.spectral.eigh_backend``):
  torch's on the CPU, CuPy's batched cuSOLVER on CUDA when ``regbench[cuda]`` is installed (no host sync in the
  step); the choice is recorded with each epoch as the diagnostic ``ses_eigh_cupy`` (1 = CuPy, 0 = torch).
* ``eigen_path="lowrank"``: the paper's randomized top-k (Sec. 5.2): ``rank`` (32, the paper's k) top eigenvalues
  by a randomized range finder (``niter`` = 2 power iterations, 8 oversampling columns) + Rayleigh-Ritz, the tail
  mass spread uniformly over the rank left (§1.7). Biased upward (Ritz values underestimate the top, the uniform
  tail is the max-entropy completion). Layers with min(B, d) ≤ rank + 8 are computed exactly.
* ``eigen_path="hutchinson"``: eq. 14 with tr(Σ log Σ) by Hutchinson (``probes`` = 16 Rademacher vectors) and a
  degree-``degree`` (32) Chebyshev interpolant of u·log u. Unbiased in the probes (a noisy penalty), biased by the
  polynomial error near zero eigenvalues. Both approximate paths use a private generator (seeded from the run's
  seed at attach), so they never shift the global random stream other methods draw from. Their measured error
  against the exact value (printed by benchmarks/ses_overhead.py) is 1e-3…1e-1 in H, and neither is faster than
  the exact min-side path at the paper's sizes (B = 256, d ≤ 512): they exist to be measured, not as defaults.
* ``every=k`` (Sec. 5.2, 8.10): the penalty on steps ≡ 0 mod k only; on the others ``wants_activations`` is False,
  nothing is captured and the loss is None. ``scale_by_k`` multiplies λ by k to keep the time-averaged strength
  (§1.7: the paper does not say; default False, the literal reading).
* Convolutional maps (B×C×H×W) use d_l = C. ``conv_reduce="gap"`` (default) averages positions (computed as the sum:
  eq. 3 is scale-invariant and the sum's backward is a view, not a full-size division): one row per image,
  as eq. 1 is written and as the reported start value (SES loss "~0.5") suggests. ``"positions"`` treats every
  position as a sample. The paper's Table 7 timings (a per-step cost that doubles with the batch) fit "positions";
  its text (eq. 1: H ∈ R^{B×d}, 1/(B−1)) and its reported start value (SES loss "~0.5"; docs/methods.md §1.3) fit
  "gap". We default to the text and record the choice with each run; ``benchmarks/ses_penalty.py`` measures both.
* A layer constant over the batch (all ReLUs dead) has no spectrum; it is skipped (P7). After centring a batch of n
  rows has rank ≤ min(n−1, d), so H ≤ log(min(n−1, d)) (P6): a target β·log d above that cap could never be met and
  its penalty would only push every layer to full rank. The target is clipped to the cap, said once per process
  (a ``SESTargetClipped`` warning; the CLI prints it as one line). The search space cannot see the model or the
  batch, so it is the clip, not the space, that keeps tuned β from proposing unreachable targets.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

# spectral_entropy (eq. 3 on a [B, d] tensor) is part of this module's public API; its math is shared with the
# engine's effective-rank diagnostic, so it lives in regbench.spectral (re-exported by regbench.metrics).
from regbench.errors import HparamError
from regbench.spectral import (  # noqa: F401
    PATHS,
    as_matrix,
    eigh_backend,
    covariance_eigenvalues,
    entropies,
    entropy_matrix,
    spectral_entropy,
    spectrum_entropy,
)

from .base import Method, StepContext, check_range

_INT_HPARAMS = {"every": 1, "rank": 1, "niter": 0, "probes": 1, "degree": 2}  # name -> minimum
_CLIP_SAID = False  # the clip notice is printed once per process, not once per run, trial or seed


class SESTargetClipped(UserWarning):
    """An SES target d^β above the batch's rank cap min(n−1, d) was clipped to the cap."""


class SES(Method):
    name = "ses"
    description = "Spectral Entropy Shaping: pull each hooked layer's spectral entropy to beta*log(d)"
    paper = "Le Bone 2026, \"Spectral Entropy Shaping (SES)\", eq. 1-6"
    defaults = {"lam": 0.01, "beta": 0.7, "layers": "auto", "conv_reduce": "gap", "every": 1, "scale_by_k": False,
                "eigen_path": "exact", "rank": 32, "niter": 2, "probes": 16, "degree": 32}

    @classmethod
    def validate(cls, hp):
        check_range("ses", "beta", hp["beta"], 0, 1, low_open=True, high_open=True)
        check_range("ses", "lam", hp["lam"], 0)
        if hp["conv_reduce"] not in ("gap", "positions"):
            raise HparamError(f"ses.conv_reduce={hp['conv_reduce']!r} is not one of: gap, positions")
        if hp["eigen_path"] not in PATHS:
            raise HparamError(f"ses.eigen_path={hp['eigen_path']!r} is not one of: {', '.join(PATHS)}")
        if not isinstance(hp["scale_by_k"], bool):
            raise HparamError(f"ses.scale_by_k={hp['scale_by_k']!r} is not a bool")
        for key, low in _INT_HPARAMS.items():
            if isinstance(hp[key], bool) or not isinstance(hp[key], int):
                raise HparamError(f"ses.{key}={hp[key]!r} is not an integer ≥ {low}")
            check_range("ses", key, hp[key], low)

    @classmethod
    def search_space(cls, trial):
        # Ranges from the paper: beta 0.3-0.9 (Exp. 2, P6), lam 1e-3-1e-1 (Table 4). The paper's hook sets
        # (Table 6: 9/5/3) become every feature layer vs the pooled one: last:K raises on models with fewer than K
        # feature layers (the MLP has 2), and a search space cannot see the model. The default "auto" (the model's
        # diagnostic layers) is a choice too, so the untuned default is a point of the space.
        return {
            "beta": trial.suggest_float("beta", 0.3, 0.9),
            "lam": trial.suggest_float("lam", 1e-3, 1e-1, log=True),
            "layers": trial.suggest_categorical("layers", ["auto", "all", "pool"]),
        }

    def attach(self, model, ctx):
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="output")
        self._seed = ctx.seed % 2**63  # the run's seed: its own generator's draws are the run's, paired across methods
        self._generator: torch.Generator | None = None
        self._targets: dict[tuple, Tensor] = {}
        self._last: tuple[list[str], Tensor, Tensor] | None = None
        self._pending = None

    def wants_activations(self, step: int) -> bool:
        return step % self.hparams["every"] == 0

    def loss(self, step: StepContext):
        hp = self.hparams
        self._pending = None
        if step.step % hp["every"]:  # composed with a method that captures every step: still skip
            return None
        mats = [entropy_matrix(step.activations[key], hp["conv_reduce"]) for key in self.keys]
        shapes = tuple(tuple(m.shape) for m in mats)
        h, valid = entropies(mats, hp["eigen_path"], rank=hp["rank"], niter=hp["niter"], probes=hp["probes"],
                             degree=hp["degree"], generator=self._rng(mats[0].device))
        # Every layer constant: no spectrum to shape (P7). Asked on the CPU only, where it costs nothing; on CUDA
        # the question is a host sync, so the loss stays a zero with a zero gradient (no sync in the step).
        if mats[0].device.type == "cpu" and not bool(valid.any()):
            return None
        self._backend = eigh_backend(mats[0].device) if hp["eigen_path"] == "exact" else "torch"
        target = self._target(shapes, h)
        total = torch.where(valid, (h - target) ** 2, 0).sum()
        self._pending = (h.detach(), valid)
        scale = hp["lam"] * (hp["every"] if hp["scale_by_k"] else 1)
        return scale * total

    def after_step(self, step):
        if self._pending is not None:  # tensors: read back once per epoch in diagnostics(), no step sync
            self._last = (self.keys, *self._pending)

    def _rng(self, device) -> torch.Generator | None:
        if self.hparams["eigen_path"] == "exact":
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
            restored = getattr(self, "_restored_rng", None)
            if restored is not None:  # a checkpoint's stream, so a resumed run draws what it would have drawn
                self._generator.set_state(restored)
                self._restored_rng = None
        return self._generator

    def state_dict(self):
        """The private generator of the randomized eigen paths (a uint8 tensor: checkpoint-safe)."""
        generator = getattr(self, "_generator", None)
        return {"rng": generator.get_state()} if generator is not None else {}

    def load_state_dict(self, state):
        self._restored_rng = state.get("rng") if state else None
        if self._restored_rng is not None and getattr(self, "_generator", None) is not None:
            self._generator.set_state(self._restored_rng)
            self._restored_rng = None

    def _target(self, shapes, like: Tensor) -> Tensor:
        """β·log d_l per layer (eq. 5), clipped to the reachable log(min(n−1, d_l)) (pitfall P6, see above)."""
        key = (shapes, like.device, like.dtype)
        if key not in self._targets:
            beta, values = self.hparams["beta"], []
            for n, d in shapes:
                target = beta * math.log(d)
                cap = math.log(min(n - 1, d)) if n > 2 and d > 1 else target
                if target > cap:
                    self._say_clipped(n, d)
                values.append(min(target, cap))
            self._targets[key] = torch.tensor(values, device=like.device, dtype=like.dtype)
        return self._targets[key]

    def _say_clipped(self, n: int, d: int) -> None:
        global _CLIP_SAID
        if _CLIP_SAID:
            return
        _CLIP_SAID = True
        beta = self.hparams["beta"]
        warnings.warn(SESTargetClipped(
            f"ses.beta={beta:.3g} targets erank d^β = {d ** beta:.1f} at a layer of width d = {d}, above the "
            f"{min(n - 1, d)} a batch of {n} rows allows; SES targets above a batch's rank cap are clipped to it "
            f"(said once)"))

    def diagnostics(self):
        if self._last is None:
            return {}
        keys, h, valid = self._last
        out = {f"ses_entropy/{k}": v for k, v, ok in zip(keys, h.tolist(), valid.tolist()) if ok}
        # which eigensolver the run used (1 = CuPy's batched cuSOLVER, 0 = torch.linalg.eigh), recorded per epoch
        out["ses_eigh_cupy"] = float(getattr(self, "_backend", "torch") == "cupy")
        return out
