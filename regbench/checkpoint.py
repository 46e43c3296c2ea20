"""Mid-run checkpoints: a killed run continues from its last saved epoch and ends bit-for-bit
where an uninterrupted run ends (on CPU).

One file per run, ``<checkpoint dir>/<config key>.pt``, holding everything the next epoch depends on: model,
optimizer and scheduler state, the batch-order and augmentation generators, the python/numpy/torch (and CUDA) global
RNG states, the method's state (``Method.state_dict``: SHADE's moving averages, …), the epoch and step counters and
the history of the finished epochs. Only tensors, numbers, strings, lists and dicts are stored, so the file loads
with ``torch.load(…, weights_only=True)`` (no pickled objects are ever executed).

Writes are atomic (a temp file in the same folder, fsync, ``os.replace``): a kill during the save leaves the previous
checkpoint intact, never a half-written one.
"""
from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regbench.atomic import atomic_file
from regbench.errors import DataError

FORMAT = 1  # bump when the layout changes; a file of another format is ignored (the run starts over)


def path_for(directory: Path | str, config_key: str) -> Path:
    return Path(directory) / f"{config_key}.pt"


# ---- global RNG states as plain tensors/lists (weights_only cannot load tuples of numpy arrays) -----------------

def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64, device="cpu"), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---- save / load ------------------------------------------------------------------------------------------------

def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: temp file in the same folder (same filesystem), fsync, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save({"format": FORMAT, **state}, f)


def load(path: Path, config_key: str, device: torch.device, epochs: int | None = None) -> dict[str, Any] | None:
    """The checkpoint of run ``config_key`` at ``path``, or None when there is none to resume from.

    A file that holds anything but plain tensors and containers (a pickled object: tampered with, or not ours) or that
    is not a readable torch file is refused with a DataError: nothing in it is executed, and the user decides whether
    to delete it. A readable checkpoint of another run or format is ignored with a warning (the run starts over and
    overwrites it), and so is one whose contents do not fit together or with the run (``epochs``, when given): its
    epoch counter, history and step disagree, a field of the wrong type (regbench/statefiles.py,
    ``checkpoint_problem``), so a hand-edited counter can never make a run with missing epochs look complete. One
    written on another device type (a CUDA run resumed with ``--device cpu``, or back) is resumed, with a warning
    that it is not bit-for-bit (``moved``)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; the one fact worth a line is the global it refused to import.
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if found:
            raise DataError(f"checkpoint {path} holds a pickled object ({found.group(1)}), refused unread; delete "
                            f"it to start that run over") from None
        raise DataError(f"checkpoint {path} is not a readable torch file (not a tensor archive); delete it to start "
                        f"that run over") from None
    # garbage bytes also raise IndexError/KeyError/TypeError from inside torch's weights-only unpickler
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"checkpoint {path} is not a readable torch file ({first.split('. ')[0][:120]}); delete it "
                        f"to start that run over") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} does not hold a regbench checkpoint; delete it to start that run over")
    from regbench.statefiles import checkpoint_problem

    why = checkpoint_problem(state, config_key, epochs, fmt=FORMAT)
    if why:
        warnings.warn(f"ignoring checkpoint {path} ({why}); the run starts over", stacklevel=2)
        return None
    if moved(state, device):
        warnings.warn(f"resuming checkpoint {path}, saved on {state.get('device_type')}, on {device.type} from epoch "
                      f"{int(state.get('epoch', 0))}, step {int(state.get('step', 0))}: weights, optimizer, schedule and "
                      f"batch order continue; the device's random streams restart, so the run is not bit-for-bit an "
                      f"uninterrupted one", stacklevel=2)
    return state


def moved(state: dict[str, Any], device: torch.device) -> bool:
    """Whether a checkpoint was written on another device type than the one resuming it (CUDA → CPU or back).
    ``torch.load(map_location=device)`` has already moved its tensors; what cannot move is the state of generators
    that live on the device (a CUDA Philox state is not a CPU Mersenne-Twister state): those restart from their seed."""
    return state.get("device_type") != device.type


# Optimizer options that pick kernels for a device, not training state: kept from the resuming optimizer (a fused
# CUDA AdamW's checkpoint resumed on a CPU optimizer built without ``fused``, or back).
_KERNEL_OPTIONS = ("fused", "foreach", "capturable")


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping this optimizer's kernel options (``_KERNEL_OPTIONS``)."""
    kept = [{k: group[k] for k in _KERNEL_OPTIONS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, options in zip(optimizer.param_groups, kept):
        for key in _KERNEL_OPTIONS:
            if key in options:
                group[key] = options[key]
            else:
                group.pop(key, None)


def restore_generator(generator: torch.Generator, saved: torch.Tensor, state: dict[str, Any]) -> None:
    """Restore a generator's state, unless it lives on the device and the checkpoint came from another device type
    (then it keeps the state it was seeded with; see ``moved``)."""
    if generator.device.type != "cpu" and moved(state, generator.device):
        return
    if generator.device.type == "cpu" and saved.numel() != generator.get_state().numel():
        return  # a device generator's state saved on another device type: not a CPU generator's state
    generator.set_state(saved.cpu())  # a generator's state is a CPU byte tensor


def resume_point(path: Path) -> tuple[int, int, str] | None:
    """Where a run would resume from the checkpoint at ``path``: (epoch, step, device type), or None when there is
    no usable checkpoint (missing, or not a regbench checkpoint of this format). For grouping runs that resume
    together (equal points: all restored at one step, on this device type or moved from another);
    ``load`` is what validates a checkpoint before it is used."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # mmap: only the few scalars read here leave the disk, not the weights (a study asks this once per sibling)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: ``load`` reports it when the run itself opens it
        return None
    from regbench.statefiles import checkpoint_problem

    if not isinstance(state, dict) or checkpoint_problem(state, path.stem, fmt=FORMAT):
        return None  # ``load`` warns about it and starts the run over
    return state["epoch"], state["step"], state["device_type"]


def remove(path: Path | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)
