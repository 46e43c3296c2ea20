"""What the commands take from flags, checked before anything is written: method names, the device, a method on its
model, --set values, checkpoint settings and files. A value that fails here fails in one line (ConfigError, exit 2)
and leaves the output dir as it was."""
from __future__ import annotations

import re
from pathlib import Path

from regbench import registry
from regbench.errors import ConfigError, RegbenchError

NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_methods(text: str) -> list[str]:
    names = ["+".join(part.strip() for part in n.split("+")) for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--methods {text!r} names no method; e.g. --methods ses,shade "
                          f"(choices: {', '.join(registry.method_names())})")
    seen: list[str] = []
    for n in names:
        registry.method_class(n)  # unknown names fail here, with the valid choices
        if n not in seen:
            seen.append(n)
    return seen if "baseline" in seen else ["baseline", *seen]


def check_device(device: str) -> None:
    import torch

    if device == "auto" or device == "cpu":
        return
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        count, index = torch.cuda.device_count(), int(device[5:] or 0)
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                              f"pick one of those, or --device cpu")
        return
    raise ConfigError(f"--device {device!r} is not one of: auto, cpu, cuda, cuda:N")


def check_attach(method_name: str, hparams: dict, model_name: str, dataset, model_kwargs: dict | None = None) -> None:
    """Attach the method to a throwaway model before anything is written, so a layer rule that is unknown or selects
    nothing on this model, or a model option the model rejects, fails now in one line instead of mid-benchmark."""
    from regbench import engine, models

    method = registry.build_method(method_name, hparams)
    try:
        model = models.create_model(model_name, dataset.num_classes, dataset.input_shape,
                                    **{**(model_kwargs or {}), **method.model_options()})
        capture = engine.ActivationCapture(model)
        method.attach(model, engine.ModelContext(model, capture, dataset.num_classes, dataset.input_shape))
        method.detach(model)
        capture.remove()
    except RegbenchError as exc:
        raise type(exc)(f"method {method_name!r} on model {model_name!r}: {exc}") from None


def typed_sets(method: str, overrides: dict) -> dict:
    """--set values typed like the defaults (resolve does the typing and range checks), only the names given."""
    resolved = registry.method_class(method).resolve(overrides)
    return {k: resolved[k] for k in overrides}


def checkpoint_options(args, directory: Path) -> dict:
    """Mid-run checkpoint settings for runner.Runner, checked before anything is written."""
    seconds = getattr(args, "checkpoint_every_seconds", 60.0)
    if not seconds >= 0:  # also NaN
        raise ConfigError(f"--checkpoint-every-seconds must be >= 0 (0 = after every epoch), got {seconds}")
    return {"checkpoint_dir": directory, "checkpoint_seconds": seconds,
            "keep_checkpoints": bool(getattr(args, "keep_checkpoints", False))}


def check_checkpoints(directory: Path) -> None:
    """An unreadable checkpoint (truncated, or holding a pickled object) fails the command before the store is opened,
    so the output dir is left as it was, rather than failing its run midway through the benchmark.
    Whether a readable one fits its run (key, format, device) is decided when that run starts (checkpoint.load)."""
    import warnings

    import torch

    from regbench import checkpoint

    for path in sorted(directory.glob("*.pt")) if directory.is_dir() else []:
        if not path.is_file():  # a folder, a broken link or a symlink loop where a checkpoint belongs
            raise ConfigError(f"checkpoint {path} is not a regular file (a folder, or a broken or looping link); "
                              f"remove it to start that run over")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # here only readability counts; a mismatch warns when its run starts
            checkpoint.load(path, path.stem, torch.device("cpu"))
