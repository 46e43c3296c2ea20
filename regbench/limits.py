"""The ranges of every number a command takes, and the checks of the environment variables regbench reads.

One table, ``NUMBERS``: option -> (lowest, highest, integer?). ``check_value`` is the one check of a number, used for
a flag (``regbench.arguments.check_arguments`` walks the chosen command's numeric options), for a value read back
from a stored plan (``regbench.statefiles.check_spec``) and for the seeds (``check_seed_list``). Upper bounds are
what the libraries accept (a seed must fit numpy's ``np.random.seed``, 0..2**32-1; torch accepts more) or far past
any sensible run, so a typo such as ``--epochs 1e9`` or ``--seeds 99999999999999999999`` is one line, exit 2,
instead of an overflow deep in a library. NaN and infinity are refused for every float.

``ENVIRONMENT`` names every variable regbench reads and how its value is checked (the same kinds as the flags it
stands in for); ``check_environment`` runs before any work.
"""
from __future__ import annotations

import math
import os

from regbench.errors import ConfigError

INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # np.random.seed and np.random.default_rng's legacy seeding take 0..2**32-1
MAX_SEEDS = 10_000  # seeds of one benchmark (each is a full training run per method)

# option -> (lowest, highest, integer)
NUMBERS: dict[str, tuple[float, float, bool]] = {
    "--epochs": (1, 100_000, True),
    "--batch-size": (1, 2**24, True),
    "--lr": (0.0, 1e4, False),  # > 0 (OPEN_LOW)
    "--weight-decay": (0.0, 1e4, False),
    "--train-size": (1, INT32_MAX, True),
    "--train-per-class": (1, INT32_MAX, True),
    "--train-acc-sample": (1, INT32_MAX, True),
    "--parallel-seeds": (1, MAX_SEEDS, True),
    "--checkpoint-every-seconds": (0.0, 1e9, False),
    "--trials": (0, 1_000_000, True),
    "--budget-epochs": (1, 10**9, True),
    "--per-gpu": (1, 256, True),
    "--workers": (1, 10_000, True),
    "--timeout-min": (1, 10**7, True),
    "--gpus-per-job": (0, 1024, True),  # launch --slurm (regbench/launch.py)
    "--cpus-per-job": (1, 100_000, True),
    "--array-parallelism": (1, 10_000, True),
    "--progress-seconds": (0.1, 1e6, False),
    "--margin": (0.0, 100.0, False),  # percentage points, > 0 (OPEN_LOW)
    "--seeds": (1, MAX_SEEDS, True),  # suite --seeds: a count
    "--port": (1, 65535, True),
    "ui --port": (0, 65535, True),  # 0: a free port
    "ui --dashboard-port": (0, 65535, True),
    "seed": (0, SEED_MAX, True),
    "split_seed": (0, SEED_MAX, True),
}

OPEN_LOW = ("--lr", "--margin")  # the lowest value itself is refused: must be > 0

# RunConfig field -> its option in NUMBERS (a stored plan's base configuration is checked with the flags' ranges)
CONFIG_FIELDS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay",
                 "train_size": "--train-size", "train_per_class": "--train-per-class",
                 "train_acc_sample": "--train-acc-sample", "split_seed": "split_seed", "seed": "seed"}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(str(value))} digits)"


def check_value(option: str, value, label: str | None = None) -> None:
    """Refuse ``value`` for ``option`` (see NUMBERS) that is not a number of its type within its range."""
    low, high, integer = NUMBERS[option]
    label = label or option
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label} must be a number, got {_shown(value)}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{label} must be a whole number, got {_shown(value)}")
    if not integer and not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value}")
    if option in OPEN_LOW and value <= low:
        raise ConfigError(f"{label} {_shown(value)} must be > {low:g}; pass a positive value")
    if not low <= value <= high:
        shown_high = f"{high:g}" if isinstance(high, float) else f"{high}"
        raise ConfigError(f"{label} {_shown(value)} is outside {low:g}..{shown_high}; pass a value in that range")


def check_seed_list(seeds, label: str = "--seeds") -> None:
    """Seeds: at least one, at most MAX_SEEDS, distinct, each within 0..SEED_MAX (what numpy and torch accept)."""
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{label}: give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise ConfigError(f"{label}: {len(seeds)} seeds is more than {MAX_SEEDS}; give fewer")
    for s in seeds:
        check_value("seed", s, f"{label}: seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{label}: seeds must be distinct")


SEEDS_SYNTAX = "a count N runs seeds 0..N-1; a list has commas: 0,1,7 (a trailing comma makes one seed a list: 7,)"


def parse_seeds(text: str, label: str = "--seeds") -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or, with at least one comma, a list of seeds: ``0,1,7``, or ``7,`` for
    seed 7 alone. Checked before any list is built (a count of 10**20 must not allocate). Every refusal says which
    reading it made (count or list) and how to write the other."""
    parts = [p.strip() for p in text.split(",")] if "," in text else [text.strip()]
    if any(not p.lstrip("-").isdigit() or len(p) > 40 for p in parts if p) or not any(parts):
        raise ConfigError(f"{label} {text[:60]!r} is neither a count nor a list of seeds; {SEEDS_SYNTAX}")
    if "," in text:
        seeds = [int(p) for p in parts if p]
        if any(s < 0 for s in seeds):
            raise ConfigError(f"{label} {text[:60]!r} is a list of seeds (it has a comma) with a negative seed; seeds "
                              f"are whole numbers >= 0")
        check_seed_list(seeds, label)
        return seeds
    count = int(parts[0])
    if count == 0:
        raise ConfigError(f"{label} 0 is read as a count (a single number is a count: N runs seeds 0..N-1) and "
                          f"0 seeds runs nothing; for seed 0 alone write {label} 0, (a trailing comma makes a list)")
    if count < 0:
        raise ConfigError(f"{label} {text[:60]!r} is read as a count of seeds, and a count cannot be negative; "
                          f"{SEEDS_SYNTAX}")
    if count > MAX_SEEDS:
        raise ConfigError(f"{label} {_shown(count)} is read as a count of seeds (a single number), more than "
                          f"{MAX_SEEDS}; give a smaller count, or a list of seeds with commas (e.g. {count},)")
    return list(range(count))


def check_numbers(actions, args) -> None:
    """Every numeric option of the chosen command (argparse ``type`` int or float), by the NUMBERS table."""
    for action in actions:
        if action.type not in (int, float) or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        option = max(action.option_strings, key=len)
        option = f"{args.command} {option}" if f"{getattr(args, 'command', '')} {option}" in NUMBERS else option
        if option not in NUMBERS:  # a new option without its row (tests/test_bad_input_generated.py asks for one)
            NUMBERS[option] = (-INT32_MAX, INT32_MAX, True) if action.type is int else (-1e15, 1e15, False)
        for item in value if isinstance(value, list) else [value]:
            check_value(option, item, option.split(" ")[-1])


# ---- environment variables ---------------------------------------------------------------------------------------------

def _fault_spec(value: str, name: str) -> None:
    from regbench import faults

    event, _, k = value.partition(":")
    k, _, action = k.partition(":")
    if action not in ("", "full") or (action == "full" and not os.path.isdir(os.environ.get("REGBENCH_FAULT_FILL",
                                                                                             "") or "\0")):
        raise ConfigError(f"${name} {value[:60]!r}: after the count only ':full' (with $REGBENCH_FAULT_FILL naming a "
                          f"folder) is known; unset it (it is a test hook)")
    events = getattr(faults, "EVENTS", None)
    if not event or (events is not None and event not in events):
        raise ConfigError(f"${name} {value[:60]!r} names no known event; unset it (it is a test hook)")
    if k and (not k.isdigit() or not 1 <= int(k) <= 10**9):
        raise ConfigError(f"${name} {value[:60]!r}: the count after ':' must be a number 1..10**9; unset it")


def _devices(value: str, name: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 4096:
        raise ConfigError(f"${name} {value[:60]!r} is not a list of devices; unset it or give e.g. 0,1")


def _http_int(value: str, name: str) -> None:
    if not value.strip().isdigit() or not 0 <= int(value) <= 86_400:
        raise ConfigError(f"${name} {value[:60]!r} must be a whole number 0..86400; unset it or fix it")


def _count(value: str, name: str) -> None:
    if not value.strip().isdigit() or not 1 <= int(value) <= 65_536:
        raise ConfigError(f"${name} {value[:60]!r} must be a whole number 1..65536; unset it or fix it")


def _npz_file(value: str, name: str) -> None:
    """Only its spelling: whether the file is there is the suite's to say, when a suite needs it."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(os.fsencode(value)) >= 4096:
        raise ConfigError(f"${name} {value[:60]!r} is not a usable path; unset it or name the .npz subset file")


def _user_name(value: str, name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", value):
        raise ConfigError(f"${name} {value[:60]!r} is not a user name; unset it or fix it")


# variable -> (the option it stands in for, whose kind checks it; or a check of its own)
ENVIRONMENT = {
    "MLFLOW_TRACKING_URI": "--tracking-uri",
    "REGBENCH_DATA": "--data-dir",
    "REGBENCH_FAULT_AT": _fault_spec,
    "CUDA_VISIBLE_DEVICES": _devices,
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": _http_int,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": _http_int,
    "SLURM_CPUS_PER_TASK": _count,  # copied to a local worker's OMP_NUM_THREADS
    "REGBENCH_CIFAR10_SUBSET": _npz_file,  # the suites' offline CIFAR-10 subset (tests and CI)
    "SUDO_USER": _user_name,  # `regbench postgres` as root runs the server as this user
}
# Read by regbench but any value is fine: compared with a fixed word (a flag), never parsed.
ENVIRONMENT_FLAGS = ("MLFLOW_ALLOW_FILE_STORE", "REGBENCH_PER_GPU_CHILD", "SUBMITIT_EXECUTOR", "OMP_NUM_THREADS",
                     "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",  # only named in a worker's label
                     "REGBENCH_FAULT_FILL")  # the last: read only with REGBENCH_FAULT_AT's ':full', checked there


def check_environment(actions, args, environ=None) -> None:
    """Each variable regbench reads, checked as the flag it stands in for (when the chosen command has that flag and
    it was not given: the flag wins) or by its own check. An empty variable counts as unset."""
    environ = os.environ if environ is None else environ
    by_option = {o: a for a in actions for o in a.option_strings}
    for name, check in ENVIRONMENT.items():
        value = environ.get(name)
        if not value:
            continue
        if isinstance(check, str):
            action = by_option.get(check)
            kind = getattr(action, "kind", None)
            if action is None or kind is None or getattr(args, action.dest, None) is not None:
                continue
            kind.check(value, f"${name}")
        else:
            check(value, name)
