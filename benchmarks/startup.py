"""Startup of the commands people type often and wait for: `regbench --help`, `regbench status OUT`,
`regbench export OUT`.

Each command is run as its own process (the console script, as a user runs it), several times in turn, and its wall
time compared with two references measured in the same loop: a bare interpreter (`python -c pass`) and
`python -c "import torch"` (what a command pays when it imports the training stack). Every process runs on this
machine under its present load, so read the ratios, not the seconds. For each command the heavy modules it imported
are listed (from `python -X importtime`): none of torch, mlflow, scipy, statsmodels, seaborn or matplotlib belongs in
these commands; pandas only in export.

    python benchmarks/startup.py [OUT] [--name NAME] [--repeat 5] [--compare SRC]

OUT: the output dir of a `regbench run` (default: a benchmark planned with `--plan-only` in a temporary folder, which
imports torch once to plan, outside the timings). --compare SRC also times the same commands run from another
regbench source tree (e.g. `git archive <commit> | tar -x -C SRC`), in the same loop: SRC's `regbench` package is put
first on PYTHONPATH. Its store must be one both versions read (tests/fixtures/tiny/regbench.db, --name tiny-400).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "mlflow", "scipy", "statsmodels", "seaborn", "matplotlib", "pandas", "timm", "sklearn")
REGBENCH = str(Path(sys.executable).parent / "regbench")


def _wall(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return took


def heavy_imports(args: list[str], env: dict) -> list[str]:
    """The heavy top-level packages a command imports (python -X importtime, on stderr)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "regbench.cli", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env, check=False)
    found = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            top = name.split(".")[0]
            if top in HEAVY:
                found.add(top)
    return sorted(found)


def _plan(folder: Path, env: dict) -> Path:
    out = folder / "out"
    subprocess.run([REGBENCH, "run", "--methods", "ses", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                    "--seeds", "2", "--out", str(out), "--plan-only", "--data-dir", str(folder / "data")],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="the output dir of a `regbench run` (default: a planned one)")
    parser.add_argument("--name", help="the benchmark, when OUT's store holds several")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command, in turn (default 5)")
    parser.add_argument("--compare", metavar="SRC", help="also time the commands from this regbench source tree")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else _plan(Path(tmp), env)
        name = ["--name", args.name] if args.name else []
        regbench = {"regbench --help": ["--help"], "regbench status OUT": ["status", str(out), *name],
                    "regbench export OUT": ["export", str(out), *name]}
        commands = {"python -c pass": ([sys.executable, "-c", "pass"], env),
                    "python -c 'import torch'": ([sys.executable, "-c", "import torch"], env)}
        commands.update({label: ([REGBENCH, *a], env) for label, a in regbench.items()})
        if args.compare:
            old = {**env, "PYTHONPATH": os.pathsep.join([str(Path(args.compare).resolve()),
                                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            commands.update({f"{label} (SRC)": ([sys.executable, "-m", "regbench.cli", *a], old)
                             for label, a in regbench.items()})
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(args.repeat):  # in turn, so a change in the machine's load touches every command alike
            for label, (command, command_env) in commands.items():
                times[label].append(_wall(command, command_env))
        imported = {label: heavy_imports(regbench[label.removesuffix(" (SRC)")], command_env)
                    for label, (_, command_env) in commands.items() if label.startswith("regbench")}
    bare = statistics.median(times["python -c pass"])
    torch_s = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<26} {'median s':>9} {'min s':>7} {'× python':>9} {'× import torch':>15}  heavy imports")
    for name, values in times.items():
        med = statistics.median(values)
        heavy = ", ".join(imported[name]) or "none" if name in imported else ""
        print(f"{name:<26} {med:9.2f} {min(values):7.2f} {med / bare:9.1f} {med / torch_s:15.2f}  {heavy}")
    print(f"({args.repeat} runs each, in turn, on {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
