"""Model factory and named layer-selection rules.

One factory (`create_model`) gives the small built-in nets used by the toy and low-data suites and, for any other
name, a timm model; ResNet-like timm models get the CIFAR stem of the SES paper (Sec. 8) on small inputs.

Methods do not hard-code layer names: they ask for a *rule* (`all`, `last:3`, `all-relu`, ...) and
`select_layers` turns it into `(name, module)` pairs for the model at hand, so one method config works on an MLP,
a 1-D CNN and a ResNet-18 alike.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
from collections import OrderedDict

from torch import nn

from regbench.errors import ConfigError, UnknownNameError

__all__ = [
    "LAYER_RULES",
    "SpatialMean",
    "classifier_layer",
    "create_model",
    "default_layer_rule",
    "feature_layers",
    "list_models",
    "select_layers",
]


# --------------------------------------------------------------------------------------------------------------
# Built-in small nets. Every activation is its own nn.ReLU module (never functional, never reused), so hooks on
# ReLUs see each activation exactly once and rule `all-relu` can find them all.
# --------------------------------------------------------------------------------------------------------------

def _mlp(num_classes: int, input_shape: tuple[int, ...], widths=(256, 256)) -> nn.Module:
    """Flatten → (Linear → ReLU) per hidden width → Linear head. Names: fc1, act1, fc2, act2, ..., head."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width_in = math.prod(input_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(width_in, width)
        layers[f"act{i}"] = nn.ReLU()
        width_in = width
    layers["head"] = nn.Linear(width_in, num_classes)
    return nn.Sequential(layers)


def _cnn(num_classes: int, input_shape: tuple[int, ...], channels=(32, 64, 128)) -> nn.Module:
    """Conv3x3 → BN → ReLU → MaxPool blocks (no pool after the last), GAP to `pool` [B, C_last], Linear head."""
    if len(input_shape) != 3:
        raise ConfigError(f"model 'cnn' needs image input (C, H, W), got input_shape={tuple(input_shape)}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = input_shape[0]
    for i, c_out in enumerate(channels, start=1):
        block = OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # BN supplies the bias
                            bn=nn.BatchNorm2d(c_out), act=nn.ReLU())
        if i < len(channels):
            block["maxpool"] = nn.MaxPool2d(2)
        layers[f"block{i}"] = nn.Sequential(block)
        c_in = c_out
    layers["pool"] = nn.Sequential(SpatialMean(), nn.Flatten())  # = AdaptiveAvgPool2d(1), vmap-friendly
    layers["head"] = nn.Linear(c_in, num_classes)
    return nn.Sequential(layers)


class SpatialMean(nn.Module):
    """Global average pooling as ``x.mean((-2, -1), keepdim=True)``: [B, C, H, W] -> [B, C, 1, 1].

    ``F.adaptive_avg_pool2d(x, 1)`` is a composite op that computes exactly this mean (same reduction, same bits, same
    autograd graph, on every device but XPU) and then, for channels-last inputs, restrides the [B, C, 1, 1] result in
    place with ``as_strided_``. torch.func.vmap has no batching rule for ``as_strided_`` and falls back to a per-sample
    loop, which made ``--parallel-seeds`` on resnet18 (channels-last on CUDA) 0.35x one run. The mean has a
    batching rule; the restride only changes the strides of a [B, C, 1, 1] tensor, which the flatten after it drops.
    timm's ``FastAdaptiveAvgPool`` is the same op; not used because this module loads without timm (importing timm
    costs every CLI start seconds) and serves the small ``cnn`` too."""

    def forward(self, x):
        return x.mean((-2, -1), keepdim=True)


def _use_spatial_mean(model: nn.Module) -> None:
    """Swap every ``AdaptiveAvgPool2d`` with output size 1 (timm's global pools included) for ``SpatialMean``: the
    same numbers, without vmap's per-sample fallback (see SpatialMean). Parameter-free, so state dicts are unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            size = getattr(child, "output_size", None)
            if isinstance(child, nn.AdaptiveAvgPool2d) and size in (1, (1, 1), [1, 1]):
                setattr(parent, name, SpatialMean())


class _AddChannelDim(nn.Module):
    """Reshape [B, L] (how mnist1d arrays come) or [B, C, L] to [B, C, L], so cnn1d takes either."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.reshape(x.shape[0], self.channels, -1)


def _cnn1d(num_classes: int, input_shape: tuple[int, ...], channels: int = 32, hidden: int = 128) -> nn.Module:
    """Three Conv1d(k=5, same padding) → ReLU blocks, MaxPool1d(2) after blocks 2 and 3, flatten,
    Linear(→hidden) → ReLU, Linear head.

    Sized for mnist1d (1, 40): 40 → 20 → 10 positions, so the hidden layer sees 32×10 features. Max-pooling beat
    stride-2 convs on mnist1d (3k samples, AdamW 3e-3, 20 epochs, batch 128: ~0.90 vs ~0.85 test accuracy).
    """
    if len(input_shape) not in (1, 2):
        raise ConfigError(f"model 'cnn1d' needs 1-D input (C, L) or (L,), got input_shape={tuple(input_shape)}")
    c_in, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict(reshape=_AddChannelDim(c_in))
    for i in (1, 2, 3):
        block = OrderedDict(conv=nn.Conv1d(c_in, channels, 5, padding=2), act=nn.ReLU())
        if i > 1:
            block["maxpool"] = nn.MaxPool1d(2)
            length //= 2
        layers[f"block{i}"] = nn.Sequential(block)
        c_in = channels
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels * length, hidden)
    layers["act_fc"] = nn.ReLU()
    layers["head"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(layers)


_BUILTINS = {"mlp": _mlp, "cnn": _cnn, "cnn1d": _cnn1d}
_TIMM_HINT = "or any timm model name (see timm.list_models())"


def list_models() -> list[str]:
    """Built-in model names (any timm name works too, but listing ~1,400 of them helps nobody)."""
    return sorted(_BUILTINS)


class UnknownModelError(UnknownNameError):
    """Unknown model name: names the built-ins, points at timm, suggests a close timm name; one short line."""

    def __init__(self, name: str):
        super().__init__("model", name, list_models())
        import timm

        close = difflib.get_close_matches(name, list_models() + timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.args = (f"unknown model {name!r}; choose one of: {', '.join(self.choices)}, {_TIMM_HINT}{hint}",)


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...], cifar_stem: bool | None = None,
                 **kwargs) -> nn.Module:
    """Build model `name` for inputs of shape `input_shape` (no batch dim) and `num_classes` outputs.

    Built-ins take their own kwargs (mlp: widths; cnn: channels; cnn1d: channels, hidden); any other name goes to
    `timm.create_model(name, num_classes=..., pretrained=False, in_chans=input_shape[0], **kwargs)`.
    `cifar_stem`: None = on for ResNet-like stems when the input is 32×32 or smaller; True demands it; False never.
    The result carries `regbench_family` ("mlp", "cnn", "cnn1d", "resnet" or "timm"), which picks layer rules.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be ≥ 1, got {num_classes}")
    if name in _BUILTINS:
        if cifar_stem:
            raise ConfigError(f"cifar_stem applies to timm ResNet-like models (conv1 + maxpool), not {name!r}")
        builder = _BUILTINS[name]
        allowed = list(inspect.signature(builder).parameters)[2:]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(f"model {name!r} has no option(s) {', '.join(unknown)}; options: {', '.join(allowed)}")
        model = builder(num_classes, input_shape, **kwargs)
        model.regbench_family = name
        return model

    import timm  # here, not at the top: it imports torchvision (~2 s), which most commands and errors never need

    if not timm.is_model(name):
        raise UnknownModelError(name)
    if len(input_shape) != 3:
        raise ConfigError(f"timm model {name!r} needs image input (C, H, W), got input_shape={input_shape}")
    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=False, in_chans=input_shape[0], **kwargs)
    except TypeError as e:  # an option this architecture does not take
        raise ConfigError(f"timm model {name!r} rejected options {sorted(kwargs)}: {e}") from None
    # Only a plain conv1 counts: deep stems (resnet*d, *t) are Sequentials whose "same in/out channels" swap
    # would not be the SES paper's stem.
    has_stem = isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")
    if cifar_stem and not has_stem:
        raise ConfigError(f"cifar_stem needs a conv1 + maxpool stem (timm ResNet-like); {name!r} has none")
    if cifar_stem is None:
        cifar_stem = has_stem and max(input_shape[1:]) <= 32
    if cifar_stem:
        _apply_cifar_stem(model)
    _use_spatial_mean(model)
    model.regbench_family = "resnet" if _is_resnet_like(model) else "timm"
    return model


def _apply_cifar_stem(model: nn.Module) -> None:
    """SES paper Sec. 8: 3×3 stride-1 first conv and no max-pool, so 32×32 inputs are not shrunk 4× at once."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm inits its convs
    model.maxpool = nn.Identity()


def _is_resnet_like(model: nn.Module) -> bool:
    return all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in range(1, 5)) and isinstance(
        getattr(model, "global_pool", None), nn.Module)


# --------------------------------------------------------------------------------------------------------------
# Layer-selection rules
# --------------------------------------------------------------------------------------------------------------

LAYER_RULES: dict[str, str] = {
    "all": "every feature layer: hidden ReLUs (+ pool) of built-in nets; ResNet blocks + global_pool; timm feature_info",
    "stages+pool": "ResNet-like only: every block of layer1-4 plus global_pool (the SES paper's 9 hooks on resnet18)",
    "last:K": "the last K feature layers (K ≥ 1), e.g. last:3 on resnet18 = layer4.0, layer4.1, global_pool",
    "pool": "the last feature layer (the pooled / penultimate representation)",
    "all-relu": "every nn.ReLU module, for pre-activation hooks as SHADE uses (17 on resnet18)",
    "name:GLOB": "modules whose qualified name matches the fnmatch GLOB, e.g. name:layer4.*",
    "weights": "every Conv and Linear module (for weight-space methods: spectral norm, DLN entropy)",
    "linear": "every nn.Linear module, classifier included",
    "hidden-weights": "every Conv and Linear module except the classifier",
    "classifier": "the final Linear layer (timm get_classifier(); `head` of built-in nets)",
}

_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def classifier_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the final Linear classifier, or None when the model has none (e.g. num_classes=0)."""
    modules = dict(model.named_modules())
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in modules.items():
            if module is head and isinstance(module, nn.Linear):
                return name, module
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None

# Names of a first feature_info entry that is the stem, not a learned stage (resnet act1, regnet stem, densenet
# norm0, mobilenet bn1): SES-style penalties on the raw stem would act on barely-transformed pixels.
_STEM_PARTS = {"conv1", "bn1", "act1", "conv_stem", "bn_stem", "norm0", "conv0", "pool0"}


def default_layer_rule(model: nn.Module) -> str:
    """Rule a method uses when the user names none. `all` for every family today; kept per-model so a family
    whose full set is too costly can get a cheaper default without touching methods."""
    return "all"


def feature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outputs representation-shaping methods measure, in forward order (see LAYER_RULES['all'])."""
    modules = dict(model.named_modules())
    family = getattr(model, "regbench_family", None)
    if family in _BUILTINS:
        names = [n for n, m in modules.items() if isinstance(m, nn.ReLU)]
        names += ["pool"] if "pool" in modules else []
    elif _is_resnet_like(model):
        names = [f"layer{i}.{child}" for i in range(1, 5) for child, _ in modules[f"layer{i}"].named_children()]
        names.append("global_pool")
    else:
        info = getattr(model, "feature_info", None) or []
        names = [entry["module"] for entry in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        if len(names) > 1 and _is_stem(names[0]):
            names = names[1:]
        if isinstance(getattr(model, "global_pool", None), nn.Module):
            names.append("global_pool")
    return _in_forward_order(model, [n for n in names if n in modules])


def _is_stem(name: str) -> bool:
    parts = name.split(".")
    return parts[0].startswith("stem") or parts[0] in _STEM_PARTS or parts[-1] in _STEM_PARTS


def _in_forward_order(model: nn.Module, names) -> list[tuple[str, nn.Module]]:
    wanted = set(names)
    return [(n, m) for n, m in model.named_modules() if n in wanted]


def select_layers(model: nn.Module, rule: str) -> list[tuple[str, nn.Module]]:
    """Resolve a named rule (see LAYER_RULES) to `(name, module)` pairs in forward order.

    Raises ConfigError (one line naming the rule, the problem and the valid rules) for an unknown or malformed
    rule, or one that selects nothing here: a silently empty selection would make a regularizer a no-op.
    """
    def fail(problem: str):
        raise ConfigError(f"layer rule {rule!r}: {problem}; valid rules: {', '.join(LAYER_RULES)}")

    if rule == "all":
        selected = feature_layers(model)
    elif rule == "stages+pool":
        if not _is_resnet_like(model):
            fail("applies to ResNet-like models only (layer1..layer4 + global_pool)")
        selected = feature_layers(model)
    elif rule == "pool":
        selected = feature_layers(model)[-1:]
    elif rule.startswith("last:"):
        k = rule[len("last:"):]
        if not k.isdigit() or int(k) < 1:
            fail("K must be an integer ≥ 1")
        layers = feature_layers(model)
        if int(k) > len(layers):  # silently hooking fewer layers than asked would mislabel an ablation
            fail(f"asks for {k} layers but this model has only {len(layers)} feature layers")
        selected = layers[-int(k):]
    elif rule == "all-relu":
        selected = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    elif rule in ("weights", "linear", "hidden-weights"):
        kinds = (nn.Linear,) if rule == "linear" else _WEIGHT_TYPES
        selected = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
        if rule == "hidden-weights":
            head = classifier_layer(model)
            selected = [(n, m) for n, m in selected if head is None or m is not head[1]]
    elif rule == "classifier":
        head = classifier_layer(model)
        selected = [head] if head else []
    elif rule.startswith("name:"):
        pattern = rule[len("name:"):]
        selected = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]
    else:
        fail("unknown rule")
    if not selected:
        fail(f"selects no layer of this {getattr(model, 'regbench_family', type(model).__name__)} model")
    return selected
