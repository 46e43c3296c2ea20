"""Model factory and layer rules: shapes, the SES CIFAR stem, and the exact hook sets methods rely on."""

import pytest
import torch
import torch.nn as nn

from regbench.errors import RegbenchError, UnknownNameError
from regbench.models import LAYER_RULES, create_model, default_layer_rule, list_models, select_layers

RESNET18_BLOCKS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def names(model, rule):
    return [n for n, _ in select_layers(model, rule)]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), cifar_stem=True)


@pytest.mark.parametrize("name, shape", [("mlp", (1, 40)), ("cnn", (3, 32, 32)), ("cnn1d", (1, 40)),
                                         ("cnn1d", (40,))])
def test_builtin_forward_shape_and_family(name, shape):
    model = create_model(name, num_classes=10, input_shape=shape)
    assert model(torch.randn(4, *shape)).shape == (4, 10)
    assert model.regbench_family == name
    assert default_layer_rule(model) == "all"


def test_builtin_relus_are_distinct_modules():
    """Hooks need one ReLU module per activation; a reused module would fire twice per forward."""
    for name, shape in [("mlp", (1, 40)), ("cnn", (3, 32, 32)), ("cnn1d", (1, 40))]:
        relus = [m for _, m in create_model(name, 10, shape).named_modules(remove_duplicate=False)
                 if isinstance(m, nn.ReLU)]
        assert len(relus) == len({id(m) for m in relus}) > 0


def test_builtin_feature_layers():
    assert names(create_model("mlp", 10, (40,), widths=(16, 16, 16)), "all") == ["act1", "act2", "act3"]
    cnn = create_model("cnn", 10, (3, 32, 32))
    assert names(cnn, "all") == ["block1.act", "block2.act", "block3.act", "pool"]
    assert names(cnn, "pool") == ["pool"]
    pooled = {}
    cnn.pool.register_forward_hook(lambda m, i, o: pooled.setdefault("out", o))
    cnn(torch.randn(2, 3, 32, 32))
    assert pooled["out"].shape == (2, 128)
    assert names(create_model("cnn1d", 10, (1, 40)), "last:1") == ["act_fc"]


def test_resnet18_cifar_stem_and_rules(resnet18):
    assert resnet18.conv1.kernel_size == (3, 3) and resnet18.conv1.stride == (1, 1)
    assert resnet18.conv1.padding == (1, 1) and resnet18.conv1.bias is None
    assert isinstance(resnet18.maxpool, nn.Identity)
    assert resnet18.regbench_family == "resnet"
    assert resnet18(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    assert names(resnet18, "stages+pool") == RESNET18_BLOCKS + ["global_pool"]
    assert names(resnet18, "all") == RESNET18_BLOCKS + ["global_pool"]
    assert names(resnet18, "last:3") == ["layer4.0", "layer4.1", "global_pool"]
    assert names(resnet18, "last:5") == ["layer3.0", "layer3.1", "layer4.0", "layer4.1", "global_pool"]
    assert names(resnet18, "pool") == ["global_pool"]
    relus = names(resnet18, "all-relu")
    assert len(relus) == 17 and relus[0] == "act1" and relus[-1] == "layer4.1.act2"
    assert names(resnet18, "name:layer4.?") == ["layer4.0", "layer4.1"]


def test_cifar_stem_auto_only_for_small_inputs():
    assert create_model("resnet18", 10, (3, 32, 32)).conv1.kernel_size == (3, 3)
    big = create_model("resnet18", 10, (3, 64, 64))
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert create_model("resnet18", 10, (3, 32, 32), cifar_stem=False).conv1.kernel_size == (7, 7)
    assert create_model("resnet18", 10, (1, 28, 28)).conv1.in_channels == 1


@pytest.mark.parametrize("name, kwargs", [("mlp", {"cifar_stem": True}), ("mlp", {"depth": 3})])
def test_bad_model_options_raise(name, kwargs):
    with pytest.raises(RegbenchError):
        create_model(name, 10, (1, 40), **kwargs)


@pytest.mark.parametrize("rule", ["bogus", "last:0", "last:x", "last:", "last:99", "name:nothing.matches*"])
def test_bad_rules_raise_one_line(resnet18, rule):
    with pytest.raises(RegbenchError) as err:
        select_layers(resnet18, rule)
    message = str(err.value)
    assert "\n" not in message and rule in message and "all-relu" in message


def test_stages_pool_rule_needs_resnet():
    with pytest.raises(RegbenchError, match="ResNet"):
        select_layers(create_model("mlp", 10, (1, 40)), "stages+pool")


def test_unknown_model_name_is_short_one_line():
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet81", 10, (3, 32, 32))
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert "cnn1d" in message and "timm" in message


def test_listings():
    assert list_models() == ["cnn", "cnn1d", "mlp"]
    assert {"all", "stages+pool", "last:K", "pool", "all-relu", "name:GLOB"} <= set(LAYER_RULES)
    assert all("\n" not in text for text in LAYER_RULES.values())


def test_other_timm_models_use_feature_info_without_stem():
    model = create_model("regnetx_002", 10, (3, 32, 32))
    assert model.regbench_family == "timm"
    assert names(model, "all") == ["s1", "s2", "s3", "s4"]  # feature_info minus the 'stem' entry
    with pytest.raises(RegbenchError, match="ResNet"):
        select_layers(model, "stages+pool")
    with pytest.raises(RegbenchError, match="conv1"):
        create_model("regnetx_002", 10, (3, 32, 32), cifar_stem=True)


def test_timm_is_imported_only_when_a_timm_model_is_built(tmp_path):
    # timm imports torchvision (~2 s of a CLI start): a usage error and a run of a built-in model never pay it.
    import subprocess
    import sys

    script = f"""
import sys
from regbench.cli import main
from regbench import engine, models, registry
from regbench.provenance import environment
assert main(["run", "--methods", "ses,nope", "--out", {str(tmp_path / 'out')!r}]) == 2
environment("cpu")
models.create_model("cnn", 10, (3, 32, 32))
registry.build_method("weight_decay", {{}})
print("timm" in sys.modules)
models.create_model("resnet18", 10, (3, 32, 32))
print("timm" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.stdout.split() == ["False", "True"], out.stderr


def _with_adaptive_pool(model):
    """A copy of ``model`` with every SpatialMean put back to the AdaptiveAvgPool2d(1) that create_model replaced."""
    import copy

    from regbench.models import SpatialMean

    original = copy.deepcopy(model)
    for parent in list(original.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SpatialMean):
                setattr(parent, name, nn.AdaptiveAvgPool2d(1))
    return original


# mobilenetv3: its pooled [B, C, 1, 1] map goes into a 1x1 conv (no flatten first), so the strides matter there
@pytest.mark.parametrize("name, kwargs", [("resnet18", {"channels": [8, 16, 32, 64]}), ("cnn", {}),
                                          ("mobilenetv3_small_050", {})])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_spatial_mean_pool_is_bit_for_bit_the_adaptive_pool(name, kwargs, channels_last, bf16):
    """create_model's global pool (a spatial mean, so vmap needs no per-sample fallback) gives the same bits as the
    AdaptiveAvgPool2d(1) it replaced: outputs in train and eval mode, BatchNorm running stats, every gradient; in
    float32 and under bf16 autocast, contiguous and channels-last (the layout of CUDA runs)."""
    from regbench.models import SpatialMean

    torch.manual_seed(0)
    model = create_model(name, 10, (3, 32, 32), **kwargs)
    assert any(isinstance(m, SpatialMean) for m in model.modules())
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    original = _with_adaptive_pool(model)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if channels_last:
        model, original = (m.to(memory_format=torch.channels_last) for m in (model, original))
        x = x.contiguous(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        outs = []
        for m in (model, original):
            getattr(m, mode)()
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = m(x)
            out.float().square().sum().backward()
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), mode
        for (n, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), n  # running stats updated alike in train mode
        for (n, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
            assert torch.equal(a.grad, b.grad), n
