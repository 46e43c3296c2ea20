"""Training augmentation (issue 5 item 1): crop_flip pads with normalized black, flips half the images, touches
training batches only, is seeded from the run seed, and is an option of the dataset (CIFAR on, embedded sets off)."""
import hashlib
import pathlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from regbench.datasets.base import AUGMENTS
from regbench.datasets.cifar import CIFAR10, augment
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import MNIST1D
from regbench.methods.base import Method

from regbench import engine, registry
from regbench.config import RunConfig
from regbench.errors import ConfigError
from regbench.suites import cifar_subset

SUBSET = cifar_subset.SUBSET  # $REGBENCH_CIFAR10_SUBSET, which tests/conftest.py always sets


def write_cifar10_subset(root, per_batch: int = 100, n_test: int = 100) -> dict[str, str]:
    """Real CIFAR-10 images (the shared recovered subset) written in the official python-pickle layout (protocol 4: readable by the restricted unpickler) under
    root/cifar-10-batches-py/; returns the md5 map the loader verifies against."""
    d = np.load(SUBSET)
    folder = pathlib.Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def rows(x_hwc):  # official rows: 1024 R, 1024 G, 1024 B
        return np.ascontiguousarray(x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072))

    parts = [(f"data_batch_{i + 1}", slice(i * per_batch, (i + 1) * per_batch), "train") for i in range(5)]
    parts.append(("test_batch", slice(0, n_test), "test"))
    for name, part, split in parts:
        doc = {"batch_label": name, "labels": [int(v) for v in d[f"y_{split}"][part]], "data": rows(d[f"x_{split}"][part])}
        (folder / name).write_bytes(pickle.dumps(doc, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in d["class_names"]]}, protocol=4))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def digits_sets():
    return {a: Digits().load(None, train_size=300, augment=a) for a in AUGMENTS}


def matches_a_window(out_i, padded_i, size):
    """Whether out_i equals (to float rounding) some size x size window of padded_i, mirrored or not."""
    for dy in range(padded_i.shape[-2] - size + 1):
        for dx in range(padded_i.shape[-1] - size + 1):
            w = padded_i[:, dy:dy + size, dx:dx + size]
            if torch.allclose(out_i, w, atol=1e-5) or torch.allclose(out_i, w.flip(-1), atol=1e-5):
                return True
    return False


def test_crop_flip_equals_torchvision_order_pad_raw_black_then_normalize(digits_sets):
    """torchvision pads the raw image with 0 and normalizes afterwards; our batched op on the normalized batch must
    give one of those crops, so the border is (0 - mean) / std per channel, not 0 (= the train mean)."""
    s = digits_sets["crop_flip"]
    x = s.x_train[:24]
    out = s.train_augment(x, torch.Generator().manual_seed(3))
    raw = x * s.std + s.mean
    reference = (F.pad(raw, (4, 4, 4, 4)) - s.mean) / s.std  # pad raw pixels with black, then normalize
    assert all(matches_a_window(out[i], reference[i], 32) for i in range(len(x)))
    wrong = F.pad(x, (4, 4, 4, 4))  # the old behaviour (normalized zeros) is told apart
    assert not all(matches_a_window(out[i], wrong[i], 32) for i in range(len(x)))


def test_padded_border_is_exactly_normalized_black(digits_sets):
    s = digits_sets["crop_flip"]
    fill = (-s.mean / s.std).reshape(3, 1, 1)
    x = torch.full((400, 3, 32, 32), 7.0)  # a value no border pixel can have
    out = s.train_augment(x, torch.Generator().manual_seed(0))
    border = out != 7.0
    assert torch.equal(out[border], fill.expand_as(out)[border])
    assert border.flatten(1).any(1).float().mean() > 0.9  # all but the (4, 4) offset (1 in 81) show border
    # back in pixel units the border is black: 0
    assert torch.allclose((out * s.std + s.mean)[border], torch.zeros(()), atol=1e-5)


def test_flips_happen_about_half_the_time():
    x = torch.randn(4000, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(1), pad=0)  # no padding: only the flip is left
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    assert 0.46 < flipped.float().mean() < 0.54  # Binomial(4000, 1/2): ±0.04 is > 5 standard deviations


def test_augment_is_an_option_of_the_dataset_and_leaves_the_split_alone(digits_sets):
    none, aug = digits_sets["none"], digits_sets["crop_flip"]
    assert (Digits.default_augment, MNIST1D.default_augment, CIFAR10.default_augment) == ("none", "none", "crop_flip")
    assert CIFAR10(augmentation=False).default_augment == "none"
    assert Digits().load(None, train_size=300).train_augment is None  # the embedded default: off
    assert none.augment == "none" and none.train_augment is None
    assert aug.augment == "crop_flip" and callable(aug.train_augment)
    assert aug.split_hash == none.split_hash and aug.indices == none.indices
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(aug, k), getattr(none, k)), k


def test_cli_offers_exactly_the_known_augmentations(capsys):
    from regbench.cli import build_parser, main

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    [action] = [a for a in run_parser._actions if a.dest == "augment"]
    assert tuple(action.choices) == AUGMENTS and action.default is None  # None: the dataset's default
    with pytest.raises(SystemExit) as e:  # argparse's own usage error: exit 2, one line
        main(["run", "--methods", "ses", "--augment", "rotate"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "invalid choice: 'rotate'" in lines[0]


def test_crop_flip_on_signals_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        MNIST1D().load(tmp_path, augment="crop_flip")
    assert "\n" not in str(e.value) and "needs image inputs (C, H, W)" in str(e.value)
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        Digits().load(None, augment="rotate")


def test_cifar10_defaults_to_crop_flip_padding_with_black_of_raw_pixels(tmp_path):
    """Through the real CIFAR reader on real CIFAR-10 images: crop_flip by default, border = raw uint8 0."""
    md5s = write_cifar10_subset(tmp_path)
    s = CIFAR10(md5s=md5s).load(tmp_path)
    assert s.augment == "crop_flip" and s.x_train.shape == (450, 3, 32, 32)
    assert CIFAR10(md5s=md5s).load(tmp_path, augment="none").train_augment is None
    x = s.x_train[:16]
    out = s.train_augment(x, torch.Generator().manual_seed(0))
    reference = (F.pad(x * s.std + s.mean, (4, 4, 4, 4)) - s.mean) / s.std
    assert all(matches_a_window(out[i], reference[i], 32) for i in range(len(x)))


class Recorder(Method):
    """A no-op regularizer that records every input the model sees, with the mode it was in."""

    name = "recorder"

    def attach(self, model, ctx):
        self.seen, self.targets = [], []
        self._handle = model.register_forward_pre_hook(
            lambda module, inputs: self.seen.append((module.training, inputs[0].detach().clone())))

    def loss(self, step):
        self.targets.append(step.targets.clone())  # no extra loss term

    def detach(self, model):
        self._handle.remove()


def run(splits, seed=0):
    method = Recorder()
    config = RunConfig(method="baseline", dataset="digits", model="cnn", epochs=1, batch_size=64, seed=seed,
                       train_size=300, augment=splits.augment, split_hash=splits.split_hash, device="cpu")
    result = engine.train(config, splits, method)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    return history, method


def rows_of(*tensors) -> set[bytes]:
    return {r.numpy().tobytes() for t in tensors for r in t}


def test_engine_augments_training_batches_only_and_repeats_per_seed(digits_sets):
    none, aug = digits_sets["none"], digits_sets["crop_flip"]
    before = {k: getattr(aug, k).clone() for k in ("x_train", "x_val", "x_test")}
    h_none, rec_none = run(none)
    h_aug, rec_aug = run(aug)
    h_aug2, _ = run(aug)
    assert h_aug == h_aug2  # one seed: identical metrics, bit for bit on CPU
    assert h_aug != h_none
    # the batch order comes from its own generator: the same labels in the same order with or without augmentation
    assert all(torch.equal(a, b) for a, b in zip(rec_none.targets, rec_aug.targets, strict=True))

    train_rows = rows_of(aug.x_train)
    clean_rows = rows_of(aug.x_train, aug.x_val, aug.x_test)
    train_in = [x for training, x in rec_aug.seen if training]
    eval_in = [x for training, x in rec_aug.seen if not training]
    assert len(train_in) == 300 // 64 and eval_in
    # every eval input (train/val/test accuracy, erank batch) is an untouched row of a split
    assert all(r.numpy().tobytes() in clean_rows for x in eval_in for r in x)
    # training inputs are augmented: almost none is a row of x_train (only an unshifted, unflipped crop would be)
    aug_rows = [r.numpy().tobytes() in train_rows for x in train_in for r in x]
    assert sum(aug_rows) < 0.1 * len(aug_rows)
    # without augmentation every training input is a row of x_train
    assert all(r.numpy().tobytes() in train_rows for training, x in rec_none.seen if training for r in x)
    for k, v in before.items():
        assert torch.equal(getattr(aug, k), v), k  # the split tensors are never modified in place


def test_config_key_changes_with_augment_train_per_class_and_split_hash():
    base = RunConfig(method="baseline", dataset="digits", model="cnn", hparams=registry.method_class("baseline").resolve({}))
    keyed = base.keyed()
    assert not {"augment", "train_per_class", "split_hash"} & set(keyed)  # unset: keys of existing stores hold
    assert RunConfig(**{**base.to_dict(), "augment": "none"}).key() == base.key()  # "none" is no augmentation
    keys = {base.key(), base.replace(augment="crop_flip").key(), base.replace(train_per_class=5).key(),
            base.replace(split_hash="a" * 64).key(), base.replace(split_hash="b" * 64).key()}
    assert len(keys) == 5
    assert base.replace(split_hash="a" * 64).key() == base.replace(split_hash="a" * 64).key()
