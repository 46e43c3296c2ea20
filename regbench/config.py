"""RunConfig: everything that decides one training run, resolved once at the CLI edge
(docs/architecture.md, "Data flows one way").

Its key (sha256 of the canonical JSON of the fields that change the result) identifies the run in the store: the
same key is never trained twice. Where the data lives and which device runs it are recorded but not keyed, so a
benchmark can resume on another machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from regbench.errors import ConfigError

NOT_KEYED = ("data_dir", "device", "eval_test", "compile")  # compile: the same run, only faster (engine.py)
KEYED_WHEN_SET = ("shift", "train_per_class", "split_hash", "augment", "train_acc_sample")

# Per-dataset training recipes for the embedded sets (CLI options override them). mnist1d: AdamW + one-cycle, the
# setting in which docs/datasets.md §8 saw regularizers separate beyond seed noise.
RECIPES: dict[str, dict[str, Any]] = {
    "mnist1d": dict(epochs=30, batch_size=128, optimizer="adamw", lr=3e-3, schedule="onecycle"),
    "digits": dict(epochs=15, batch_size=64, optimizer="adamw", lr=3e-3, schedule="onecycle"),
}
GENERIC_RECIPE = dict(epochs=10, batch_size=128, optimizer="sgd", lr=0.05, schedule="cosine")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "multistep", "onecycle")


@dataclass(frozen=True)
class RunConfig:
    method: str
    dataset: str
    model: str
    hparams: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    split_seed: int = 0
    train_size: int | None = None
    train_per_class: int | None = None  # K per class instead of train_size (keyed only when set)
    split_hash: str | None = None  # sha256 of the split indices the run trained on (datasets/base.py; keyed when set)
    augment: str | None = None  # training augmentation, e.g. "crop_flip"; None = none (keyed only when set)
    shift: str | None = None  # a shift set evaluated after training (keyed only when set: old keys stay valid)
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "onecycle"
    epochs: int = 15
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    data_dir: str = ""
    eval_test: bool = True
    compile: bool = False  # torch.compile the training forward (--compile); not keyed, like device
    # Train accuracy on a fixed subsample of N training images instead of the whole split (evaluation.train_rows): the
    # per-epoch eval-mode pass over the train split is a second pass over the data (45k images on CIFAR). The sample
    # depends only on split_seed, so every method and seed is measured on the same images. None = the whole split.
    train_acc_sample: int | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):  # also NaN, which compares false
            raise ConfigError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        if self.train_size is not None and self.train_per_class is not None:
            raise ConfigError("give --train-size or --train-per-class, not both")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError(f"--train-per-class must be at least 1, got {self.train_per_class}")
        if self.train_acc_sample is not None and self.train_acc_sample < 1:
            raise ConfigError(f"--train-acc-sample must be at least 1 (or left out: the whole train split), "
                              f"got {self.train_acc_sample}")
        if self.augment == "none":  # one spelling of "no augmentation", so it has one key
            object.__setattr__(self, "augment", None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls(**json.loads(text))

    def keyed(self) -> dict[str, Any]:
        # Fields added after stores existed are keyed only when set, so those stores' keys stay valid.
        return {k: v for k, v in self.to_dict().items()
                if k not in NOT_KEYED and not (k in KEYED_WHEN_SET and v is None)}

    def key(self) -> str:
        """Stable identity of the run: sha256 of the canonical JSON of the keyed fields."""
        blob = json.dumps(self.keyed(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def group_key(self) -> str:
        """Identity of the configuration across seeds (what a leaderboard row aggregates)."""
        blob = json.dumps({k: v for k, v in self.keyed().items() if k != "seed"}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def parse_sets(items: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    """``--set ses.beta=0.6`` (repeatable) → {"ses": {"beta": "0.6"}}; typing happens in Method.resolve."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, eq, value = item.partition("=")
        method, dot, hparam = name.strip().partition(".")
        if not eq or not dot or not method or not hparam or not value.strip():
            raise ConfigError(f"malformed --set {item!r}; write METHOD.HPARAM=VALUE, e.g. --set ses.beta=0.6")
        if method not in methods:
            hosts = [m for m in methods if method in m.split("+")]
            fix = f"{hosts[0]}.{method}.{hparam}={value.strip()}" if hosts else ""
            hint = f"; for the composite write --set {fix if fix.isprintable() else repr(fix)}" if hosts else ""
            raise ConfigError(f"--set {item!r} names method {method!r}, which is not in --methods "
                              f"({', '.join(methods)}){hint}")
        out.setdefault(method, {})[hparam] = value.strip()
    return out
