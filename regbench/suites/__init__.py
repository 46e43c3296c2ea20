"""Paper suites: `regbench suite NAME` runs one experiment of a seed paper end to end
(docs/architecture.md, "The house").

Each suite is one module with ``NAME``, ``DESCRIPTION`` and ``run(out_dir, seeds=None, smoke=False) -> dict``: it
trains through the harness pieces (engine, methods, metrics, stats), writes ``OUT/NAME.md`` with our numbers next to
the paper's (seeds, 95 % t-intervals, one plain verdict per claim) and its figures under ``OUT/figures/``, and
returns the numbers it reported (the tests assert on them). Modules are imported only when their suite runs.

A suite whose arms can be benchmarks runs them through the store and protocol of ``regbench run``
(regbench/suites/store_arms.py: ``OUT/NAME-store``), so a rerun of the same command trains nothing already there; a
suite that cannot says why in one line, its module's ``NOT_A_BENCHMARK``, printed when it runs.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from regbench.arguments import CACHE_DIR, OUTPUT_DIR
from regbench.errors import ConfigError, UnknownNameError

# NAME -> module (relative to this package), in the priority order.
SUITES = {
    "ses-rings": "ses_rings",
    "dln-equilibrium": "dln_equilibrium",
    "ses-beta-sweep": "ses_beta_sweep",
    "ses-cifar": "ses_cifar",
    "shade-lowdata": "shade_lowdata",
    "shade-cifar": "shade_cifar",
}
DEFAULT_OUT = Path("reports") / "suites"


def suite_module(name: str):
    if name not in SUITES:
        raise UnknownNameError("suite", name, SUITES)
    return importlib.import_module(f"{__name__}.{SUITES[name]}")


def run_suite(name: str, out_dir: Path | str = DEFAULT_OUT, seeds: int | None = None, smoke: bool = False,
              data_dir: Path | str | None = None) -> dict:
    """Run suite ``name``; returns its result dict (numbers reported, ``report`` = the markdown path).

    Suites with ``NEEDS_DATA`` also get ``data_dir`` (the data sets' folder, resolved at the CLI edge); a suite's
    ``preflight(smoke=..., data_dir=...)`` runs before anything is written (e.g. no GPU, no data files: one line)."""
    module = suite_module(name)
    if seeds is not None and seeds < module.MIN_SEEDS:
        raise ConfigError(f"--seeds {seeds} is too few for suite {name!r}: its intervals need at least "
                          f"{module.MIN_SEEDS}; pass --seeds {module.MIN_SEEDS} or more")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a directory for the report and its figures")
    extra = {"data_dir": data_dir} if getattr(module, "NEEDS_DATA", False) else {}
    if hasattr(module, "preflight"):
        module.preflight(smoke=smoke, **extra)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    return module.run(out_dir, seeds=seeds, smoke=smoke, **extra)


def add_parser(subparsers) -> None:
    """Register `suite` on the top-level subparsers of regbench.cli."""
    names = ", ".join(SUITES)
    p = subparsers.add_parser("suite", help=f"reproduce a seed paper's experiment ({names})",
                              description="Run one paper experiment end to end and write OUT/NAME.md: our numbers "
                                          "next to the paper's, seeds, 95 %% intervals and a verdict per claim; "
                                          "figures go to OUT/figures/.")
    p.add_argument("name", help=f"the suite: {names}")
    p.add_argument("--seeds", type=int, help="number of training seeds (default: the suite's, at least 5 where "
                                             "the paper's claim is over seeds)")
    p.add_argument("--smoke", action="store_true", help="the same pipeline, cut to seconds (for tests)")
    p.add_argument("--quiet", action="store_true", help="no progress or warnings; print only the report's path")
    p.add_argument("--out", default=str(DEFAULT_OUT), kind=OUTPUT_DIR,
                   help=f"report directory (default: {DEFAULT_OUT})")
    p.add_argument("--data-dir", kind=CACHE_DIR,
                   help="where the data sets live, for suites that read files (ses-cifar, shade-cifar; "
                        "default: $REGBENCH_DATA or ~/.cache/regbench)")


def suite_command(args) -> int:
    started = time.perf_counter()
    from regbench.arguments import default_data_dir as _default_data_dir

    data_dir = Path(getattr(args, "data_dir", None) or _default_data_dir()).expanduser()
    if getattr(args, "quiet", False):  # as `run --quiet`: nothing but the result (errors still go to stderr)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_suite(args.name, args.out, seeds=args.seeds, smoke=args.smoke, data_dir=data_dir)
        print(result["report"])
        return 0
    why = getattr(suite_module(args.name), "NOT_A_BENCHMARK", None)
    if why:
        print(f"{args.name}: not a benchmark: {why}", flush=True)
    result = run_suite(args.name, args.out, seeds=args.seeds, smoke=args.smoke, data_dir=data_dir)
    print(f"{args.name}: wrote {result['report']} in {time.perf_counter() - started:.0f} s")
    return 0
