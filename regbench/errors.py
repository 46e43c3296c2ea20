"""Errors a user can cause. `cli.py` catches `RegbenchError` once: one line on stderr, exit 2."""


class RegbenchError(Exception):
    """A mistake in user input; the message names the problem and the fix, in one line."""


class UnknownNameError(RegbenchError):
    """An unknown method, dataset, model or layer-rule name."""

    def __init__(self, kind: str, name: str, choices):
        choices = sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")
        self.kind, self.name, self.choices = kind, name, choices


class HparamError(RegbenchError):
    """An hyperparameter outside its valid range, or one the method does not have."""


class ConfigError(RegbenchError):
    """Malformed or conflicting options (e.g. a bad --set, an output dir that is a file)."""


class DataError(RegbenchError):
    """Missing or corrupt data files."""


class StorageError(RegbenchError):
    """A storage URL that cannot be opened."""
