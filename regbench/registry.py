"""Finds methods and datasets through entry points: one mechanism for built-in and third-party plugins."""
from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from regbench.errors import RegbenchError, UnknownNameError

METHOD_GROUP = "regbench.methods"
DATASET_GROUP = "regbench.datasets"


@cache
def _group(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def _load(group: str, kind: str, name: str):
    eps = _group(group)
    if name not in eps:
        raise UnknownNameError(kind, name, eps)
    try:
        return eps[name].load()
    except Exception as exc:  # a broken third-party plugin must not take the CLI down with a traceback
        raise RegbenchError(f"{kind} plugin {name!r} ({eps[name].value}) failed to import: {exc}") from exc


def method_names() -> list[str]:
    return sorted(_group(METHOD_GROUP))


def dataset_names() -> list[str]:
    return sorted(_group(DATASET_GROUP))


def method_class(name: str):
    """The Method subclass registered under ``name``; ``a+b`` gives the composite of registered methods a and b."""
    from regbench.methods.base import Method
    from regbench.methods.composite import SEPARATOR

    if SEPARATOR in name:
        return _composite(name)
    cls = _load(METHOD_GROUP, "method", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RegbenchError(f"method plugin {name!r} is not a regbench.methods.base.Method subclass")
    return cls


def build_method(name: str, hparams: dict | None = None):
    """A fresh Method instance for one run (hparams resolved and validated)."""
    return method_class(name)(hparams or {})


def dataset(name: str):
    """An instance of the Dataset plugin registered under ``name``."""
    return _load(DATASET_GROUP, "dataset", name)()


@cache
def _composite(name: str):
    from regbench.methods.composite import SEPARATOR, compose

    return compose([method_class(part.strip()) for part in name.split(SEPARATOR)])
