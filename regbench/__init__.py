"""regbench: benchmark harness for entropy-based and classic regularizers."""

__version__ = "0.1.0"
