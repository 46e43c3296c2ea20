"""`regbench data list|verify|prepare [NAME]`: argument parsing and printing only; the logic is
regbench.datasets.catalog (what each set is, its files, md5s, URLs, status, verification, preparation)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from regbench.arguments import LOOKUP_DIR, OUTPUT_DIR

EXIT_CORRUPT = 2


def add_parser(subparsers) -> None:
    """Register `data` and its three subcommands on the top-level subparsers of regbench.cli."""
    data = subparsers.add_parser(
        "data", help="list, verify or prepare data sets (official files, embedded data, generated -style sets)",
        description="What is in the data cache (--data-dir, default $REGBENCH_DATA or ~/.cache/regbench), what is "
                    "missing and where to get it, md5 checks, downloads and generation of the -style sets.")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    help_dir = "dataset cache (default: $REGBENCH_DATA or ~/.cache/regbench)"
    ls = sub.add_parser("list", help="present / missing / partial, with what to download and where to put it")
    ls.add_argument("name", nargs="?", help="one data set (default: all)")
    ls.add_argument("--data-dir", default=None, help=help_dir, kind=LOOKUP_DIR)
    ver = sub.add_parser("verify", help="md5-check every present file; exit 2 if any is corrupt")
    ver.add_argument("name", nargs="?", help="one data set (default: all)")
    ver.add_argument("--data-dir", default=None, help=help_dir, kind=LOOKUP_DIR)
    prep = sub.add_parser("prepare", help="download (official) or generate (-style) one data set")
    prep.add_argument("name", help="the data set, e.g. cifar10_c_style or cifar10")
    prep.add_argument("--data-dir", default=None, help=help_dir, kind=OUTPUT_DIR)


def _names(name: str | None) -> list[str]:
    from regbench.datasets import catalog

    return list(catalog.NAMES) if name is None else [catalog._check_name(name)]


def data_command(args, default_data_dir: str) -> int:
    from regbench.datasets import catalog

    data_dir = Path(args.data_dir or default_data_dir).expanduser()
    if args.data_dir is None:  # --data-dir itself was checked by regbench.arguments; $REGBENCH_DATA is checked here
        (OUTPUT_DIR if args.data_command == "prepare" else LOOKUP_DIR).check(
            str(data_dir), "$REGBENCH_DATA" if os.environ.get("REGBENCH_DATA") else "the default data dir")
    if args.data_command == "prepare":
        catalog.prepare(args.name, data_dir, say=lambda msg: print(msg, flush=True))
        return 0
    names = _names(args.name)
    if args.data_command == "list":
        print(f"data dir: {data_dir}")
        for name in names:
            st = catalog.status(name, data_dir)
            print(f"{name:17s} {st.kind:9s} {st.state:8s} {st.detail}")
            for dl in st.missing:
                print(f"    get {dl.describe(data_dir)}")
        return 0
    corrupt = []
    for name in names:
        st, bad = catalog.verify(name, data_dir)
        if bad:
            corrupt.append(name)
            print(f"{name}: BAD {'; '.join(bad)}")
        elif st.checks:
            n = len(st.checks)
            print(f"{name}: OK ({n} file{'s' if n != 1 else ''}{'' if st.state == 'present' else ', ' + st.state})")
        else:
            print(f"{name}: {st.state}, nothing on disk to verify")
    if corrupt:
        print(f"regbench: error: corrupt files in {', '.join(corrupt)} (see above); delete them and run "
              f"`regbench data prepare NAME`", file=sys.stderr)
        return EXIT_CORRUPT
    return 0
