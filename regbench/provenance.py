"""Provenance recorded with every run and every report (benchopt-style): versions, device, git commit."""
from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import regbench


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout regbench runs from, or None (an installed wheel, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(regbench.__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def environment(device: str) -> dict:
    """Versions, the device a run used, and the git commit when known."""
    # timm's version from its metadata: ``import timm`` alone costs ~2 s (torchvision), for runs that never use it
    from importlib.metadata import version

    import optuna
    import torch

    env = {"regbench": regbench.__version__, "torch": torch.__version__, "timm": version("timm"),
           "optuna": optuna.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
           "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    commit = git_commit()
    if commit:
        env["git_commit"] = commit
    return env
