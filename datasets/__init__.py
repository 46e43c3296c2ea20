"""Built-in datasets, installed as `regbench.datasets` (never a top-level `datasets`, which would
shadow Hugging Face's). Each family is one module with a `Dataset` subclass from `.base`; they are
found through the "regbench.datasets" entry points by `regbench.registry`, so nothing is imported
here eagerly (mnist1d pulls in matplotlib)."""
