"""The training set held once on the device; batches are gathered, normalized and augmented there.

airbench's lesson (docs/architecture.md, "Style"): a small image set fits in GPU memory many times over, so the fastest
loader is no loader. ``DeviceData`` copies the train split to the device once, as raw uint8 pixels when the dataset has
them (``Splits.x_train_u8``: CIFAR, MNIST-M; a quarter of float32's bytes), as float32 otherwise (mnist1d, digits). A
batch is one gather by index, one normalization (a table lookup, below) and the split's own ``train_augment`` (the
crop+flip of datasets/cifar.py, batched tensor ops drawing from the engine's augmentation generator) — no DataLoader,
no workers, no host round trip. The same code runs on CPU tensors, which is how the tests check it.

Normalization by table: a uint8 pixel of channel c can take 256 values, so its normalized float is looked up in a
(C, 256) table computed on the host with exactly the arithmetic ``datasets/base.py`` ``build_splits`` applies to the
float split, ``((float32(u) / float32(pixel_scale)) - mean_c) / std_c``. The looked-up batch is therefore bit-identical
to the same rows of ``Splits.x_train`` on any device (a CUDA kernel dividing by a host scalar multiplies by its
reciprocal, which can differ in the last bit; a table has no device arithmetic at all). ``DeviceData`` checks this on
the first rows when it is built and falls back to the float split if a dataset's pixels do not reproduce it.

When the set does not fit (more than half of the free device memory), it stays on the host (pinned on CUDA) and each
batch is gathered there and copied over; uint8 batches are still normalized on the device.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

DEVICE_FRACTION = 0.5  # at most this share of the free device memory is spent on the resident train split
_CHECK_ROWS = 64       # rows compared against the float split when a uint8 copy is built


def pixel_table(mean: torch.Tensor, std: torch.Tensor, pixel_scale: float = 1.0) -> torch.Tensor:
    """(C, 256) float32: the normalized value of every uint8 pixel value per channel, computed as build_splits does
    (float32 pixels, divided by ``pixel_scale`` in numpy float32 when it is not 1, then ``sub_(mean).div_(std)``)."""
    channels = mean.numel()
    values = np.arange(256, dtype=np.float32)
    if pixel_scale != 1:
        values = values / np.float32(pixel_scale)  # how datasets/mnist_m.py scales its float split
    table = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(values, (channels, 256))))
    return table.sub_(mean.reshape(channels, 1).float()).div_(std.reshape(channels, 1).float())


class DeviceData:
    """``splits``' training inputs and labels on ``device``; ``batch(idx, generator)`` gives one training batch.

    ``raw=False`` forces the float32 copy even when uint8 pixels exist (the plain path, for comparisons);
    ``channels_last`` returns 4-D batches in channels-last memory format (the fast CUDA step, regbench/engine.py);
    ``resident`` forces the copy onto the device (True) or keeps it on the host (False); None = whether it fits.
    """

    def __init__(self, splits, device: torch.device | str, *, raw: bool = True, channels_last: bool = False,
                 resident: bool | None = None):
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.augment = getattr(splits, "train_augment", None)
        self.table: torch.Tensor | None = None
        pixels = getattr(splits, "x_train_u8", None) if raw else None
        if pixels is not None and not self._reproduces(splits, pixels):
            warnings.warn(f"dataset {splits.name!r}: its uint8 pixels do not reproduce the normalized train split; "
                          f"training from the float32 copy", stacklevel=2)
            pixels = None
        source = splits.x_train if pixels is None else pixels
        if resident is None:
            resident = self.device.type == "cpu" or source.nbytes <= DEVICE_FRACTION * _free_bytes(self.device)
        self.resident = resident
        if self.resident:
            self.x = source.to(self.device)
        else:  # gathered on the host, copied per batch; pinned so the copy can overlap the step
            self.x = source.pin_memory() if self.device.type == "cuda" else source
        if pixels is not None:
            self.table = pixel_table(splits.mean, splits.std, getattr(splits, "pixel_scale", 1.0)).to(self.device)
            # flat index of (channel c, value u) = c * 256 + u; shaped to broadcast over a (B, C, ...) batch
            shape = (1, -1) + (1,) * (pixels.ndim - 2)
            self.offsets = (torch.arange(self.table.shape[0], device=self.device) * 256).reshape(shape)
        self.y = splits.y_train.to(self.device)
        self.n = len(self.y)

    @property
    def dtype(self) -> torch.dtype:
        """uint8 when the resident copy is raw pixels, else float32."""
        return self.x.dtype

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, ...) on the device → the normalized float32 batch, bit-identical to the float split's rows."""
        return torch.take(self.table, pixels.long() + self.offsets)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None):
        """Rows ``idx`` (a LongTensor on the device): normalized, then the split's train_augment with ``generator``
        — the order and the draws of the plain float path (batches gathered on the host), so batches are equal."""
        if self.resident:
            xb = self.x[idx]
        else:
            xb = self.x[idx.cpu()].to(self.device, non_blocking=True)
        if self.table is not None:
            xb = self.normalize(xb)
        if self.augment is not None:
            xb = self.augment(xb, generator)
        if self.channels_last and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y[idx]

    @staticmethod
    def _reproduces(splits, pixels: torch.Tensor) -> bool:
        if pixels.dtype != torch.uint8 or pixels.shape != splits.x_train.shape or splits.mean is None:
            return False
        rows = slice(0, min(_CHECK_ROWS, len(pixels)))
        table = pixel_table(splits.mean, splits.std, getattr(splits, "pixel_scale", 1.0))
        offsets = (torch.arange(table.shape[0], device=table.device) * 256).reshape((1, -1) + (1,) * (pixels.ndim - 2))
        return torch.equal(torch.take(table, pixels[rows].long() + offsets), splits.x_train[rows])


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 0
