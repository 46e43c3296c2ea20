"""Models under torch.func.vmap over stacked seeds (how ``--parallel-seeds`` trains K seeds at once, regbench/stacked.py):
no op of the forward or backward may fall back to vmap's per-sample loop, and the vmapped group must equal each seed's
model run alone. Issue 19: resnet18's global pool (AdaptiveAvgPool2d's in-place restride of channels-last outputs,
``aten::as_strided_``) had no batching rule, so K seeds under vmap ran at 0.35× one seed on an H200.

Channels-last is how the engine lays out 4-D weights and batches on CUDA (engine.fast_step); on the CPU it is what makes
the fallback show, so the models are tested in that layout as well as the CPU's default one."""
import copy
import warnings

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from regbench.models import create_model

K, B = 2, 4
SMALL = {"resnet18": {"channels": [8, 16, 32, 64]}, "cnn": {"channels": [8, 16, 32]}}  # same blocks, fewer channels


def _fallbacks(caught) -> list[str]:
    return sorted({str(w.message) for w in caught if "batching rule" in str(w.message)})


@pytest.fixture
def fallback_warnings():
    """Turn on torch's per-sample fallback warning for the test, and off again after (torch's default; torch has no
    getter for it)."""
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    yield
    torch._C._functorch._set_vmap_fallback_warning_enabled(False)


@pytest.mark.parametrize("name", ["resnet18", "cnn"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmapped_seeds_have_no_fallback_and_equal_each_seed_alone(fallback_warnings, name, channels_last, mode):
    models = []
    for seed in range(K):
        torch.manual_seed(seed)
        models.append(create_model(name, 10, (3, 32, 32), **SMALL[name]))
    if mode == "train":  # BatchNorm in training mode: batch statistics, running stats updated in place
        for m in models:
            m.train()
    else:
        for m in models:  # non-trivial running stats to normalize with
            m.train()
            m(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
            m.eval()
    x = torch.randn(K, B, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
        x = torch.stack([xk.contiguous(memory_format=torch.channels_last) for xk in x])
    alone = [copy.deepcopy(m) for m in models]  # run one seed at a time, from the same state
    params, buffers = stack_module_state(models)
    template = models[0]

    def forward(p, b, xb):
        return functional_call(template, (p, b), (xb,))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = vmap(forward, randomness="error")(params, buffers, x)
        logits.square().sum().backward()
    assert not _fallbacks(caught), f"vmap fell back to a per-sample loop: {_fallbacks(caught)}"

    for k, m in enumerate(alone):
        out = m(x[k])
        out.square().sum().backward()
        torch.testing.assert_close(logits[k], out, rtol=1e-5, atol=1e-5)
        for n, p in m.named_parameters():
            torch.testing.assert_close(params[n].grad[k], p.grad, rtol=1e-4, atol=1e-5, msg=f"grad {n} seed {k}")
        for n, buf in m.named_buffers():  # running mean/var and num_batches_tracked, updated (train) or kept (eval)
            torch.testing.assert_close(buffers[n][k], buf, rtol=1e-5, atol=1e-6, msg=f"buffer {n} seed {k}")
