"""Every reference in the checkout points inside the checkout.

Scanned: every .py, .sh, .md, .toml, .ini, .cfg, .cff, .yml and .yaml file, and the scripts in .ci/, outside .git and
build or cache folders. A problem is

* a path that climbs out of the file's folder (a leading ``..`` segment) to something that is not in the checkout;
* a path through a folder named ``shared`` that the checkout does not have (URLs aside);
* ``DESIGN.md`` when the checkout has none (the design is docs/architecture.md);
* ``NAME.md §N`` when docs/NAME.md does not exist, and ``docs/NAME.md`` when that file does not exist;
* ``docs/NAME.md §N`` (or ``NAME.md §N``, ranges ``§N-M`` and lists ``§N, §M`` included) when docs/NAME.md has no
  heading that starts with the section number N (``§3`` is ``## 3. ...``, not ``### 3.1``; ``§5(b)`` is ``5(b) ...``);
* ``docs/NAME.md, "Title"`` when docs/NAME.md has no heading containing that title;
* a file path under one of the checkout's top-level folders (``regbench/study.py``, ``benchmarks/x.py``) that is not
  there.

The checker's own test writes each kind of bad reference into a probe checkout in tmp_path and sees it reported.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = (".py", ".sh", ".md", ".toml", ".ini", ".cfg", ".cff", ".yml", ".yaml")
SCRIPT_DIRS = (".ci",)  # extensionless scripts live here
SKIP_DIRS = {".git", "__pycache__", ".ruff_cache", ".pytest_cache", ".mypy_cache", ".tox", ".venv", "venv",
             "node_modules", "build", "dist", ".eggs"}

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# A path whose first segments are "..": "../a/b.txt", "../../x". Not a ".." inside a path ("a/../b").
UP = re.compile(r"(?<![\w./-])((?:\.\./)+)([\w.-]+(?:/[\w.-]+)*)")
SHARED = re.compile(r"(?<![\w.~-])(/?(?:[\w.~-]+/)*shared/[\w./-]*)")  # "shared" as a whole path segment
DESIGN = re.compile(r"(?<![\w/-])DESIGN\.md")
SECTION = r"§\s?[0-9][0-9.]*(?:\([a-z]\))?(?:\s?[-–]\s?[0-9][0-9.]*(?:\([a-z]\))?)?"
# "docs/methods.md §1.3-1.7, §2.4" or "dln.md §5(b)": the doc (with or without docs/), then its sections.
CITE = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*)([\w-]+)\.md((?:,?\s?" + SECTION + r")+)")
DOC = re.compile(r"(?<![\w.-])docs/([\w./-]+?\.md)\b")
TITLED = re.compile(r"(?<![\w.-])docs/([\w./-]+?\.md),?\s+\"([^\"\n]{2,80})\"")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# "regbench/study.py", "tests/fixtures/README.md": a path with a file extension (placeholders and globs cut it short).
REPO_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w-]+\.[A-Za-z]{1,5})(?![\w/*{<$])")


def checkout_files(root: Path) -> list[Path]:
    """The checkout's files: in a git work tree, those git tracks or would add (what .gitignore leaves out, such as
    the runs/ a Quick start writes, is output, not the checkout); elsewhere every file outside SKIP_DIRS."""
    try:
        done = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              capture_output=True, check=True)
        inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                                text=True, check=True).stdout.strip()
        if Path(inside).resolve() == root.resolve():
            return sorted(root / name for name in done.stdout.decode().split("\0") if name)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / name for name in files]
    return sorted(found)


@functools.cache
def checkout_folders(root: Path) -> frozenset[str]:
    """The checkout's top-level folders: those holding one of its files (runs/, an output folder, is not one)."""
    return frozenset(p.relative_to(root).parts[0] for p in checkout_files(root) if len(p.relative_to(root).parts) > 1)


def scanned_files(root: Path):
    """The files of the checkout that can hold a reference."""
    for path in checkout_files(root):
        rel = path.relative_to(root)
        in_script_dir = len(rel.parts) > 1 and rel.parts[0] in SCRIPT_DIRS
        if (path.name.endswith(EXTENSIONS) or in_script_dir) and path.is_file():
            yield path


def headings(path: Path) -> list[str]:
    return HEADING.findall(path.read_text(encoding="utf-8", errors="replace"))


def has_section(heads: list[str], number: str) -> bool:
    """A heading starts with ``number`` and the number ends there: §3 is "3. Free energy" or "3 Setup", not "3.1"."""
    pat = re.compile(re.escape(number) + r"(?!\d)(?!\.\d)")
    return any(pat.match(h) for h in heads)


def section_numbers(text: str) -> list[str]:
    """'§1.3-1.7, §2.4' -> ['1.3', '1.7', '2.4'] (both ends of a range must exist)."""
    out = []
    for part in re.findall(SECTION, text):
        for num in re.split(r"\s?[-–]\s?", part.lstrip("§").strip()):
            out.append(num.rstrip("."))
    return out


def problems_in(text: str, where: Path, root: Path) -> list[str]:
    """Every reference in ``text`` (the contents of ``where``) that points outside ``root`` or at nothing there."""
    found = []
    lines = URL.sub(" ", text).splitlines()
    docs = root / "docs"
    folders = checkout_folders(root)
    cache: dict[Path, list[str]] = {}

    def doc_headings(p: Path) -> list[str]:
        if p not in cache:
            cache[p] = headings(p)
        return cache[p]

    def say(lineno: int, ref: str, why: str):
        found.append(f"{where.relative_to(root)}:{lineno}: {ref!r}: {why}")

    for lineno, line in enumerate(lines, 1):
        for m in UP.finditer(line):
            ups, rest = m.group(1), m.group(2).rstrip(".")
            if "/" not in rest and "." not in rest.strip("."):
                continue  # "../x", "../../etc": a bare name (test data for path checks), not a reference
            target = (where.parent / (ups + rest)).resolve()
            if not target.is_relative_to(root.resolve()):
                say(lineno, m.group(0), "climbs out of the checkout")
            elif not target.exists():
                say(lineno, m.group(0), "no such path in the checkout")
        for m in SHARED.finditer(line):
            ref = m.group(1).rstrip(".")
            if ref.startswith("."):
                continue  # a parent-relative path: reported above
            target = (root / ref).resolve()
            if ref.startswith(("/", "~")) or not target.is_relative_to(root.resolve()) or not target.exists():
                say(lineno, ref, "a shared folder outside the checkout")
        for m in DESIGN.finditer(line):
            if not (root / "DESIGN.md").exists():
                say(lineno, m.group(0), "no DESIGN.md in the checkout; cite docs/architecture.md")
        for m in CITE.finditer(line):
            prefix, name, sections = m.group(1), m.group(2), m.group(3)
            if name == "DESIGN":
                continue  # its own rule above
            if prefix not in ("", "docs/"):
                if prefix.startswith("../") or "shared/" in prefix:
                    continue  # reported above
                say(lineno, m.group(0).strip(), "a section cited in a document outside docs/")
                continue
            doc = docs / f"{name}.md"
            if not doc.is_file():
                say(lineno, m.group(0).strip(), f"docs/{name}.md does not exist")
                continue
            for num in section_numbers(sections):
                if not has_section(doc_headings(doc), num):
                    say(lineno, m.group(0).strip(), f"docs/{name}.md has no heading starting with {num}")
        for m in DOC.finditer(line):
            if not (docs / m.group(1)).is_file():
                say(lineno, m.group(0), "no such file in docs/")
        for m in REPO_PATH.finditer(line):
            ref = m.group(1)
            top = ref.split("/", 1)[0]
            if top not in ("docs", "..", ".") and top in folders and not (root / ref).exists():
                say(lineno, ref, "no such file in the checkout")
        for m in TITLED.finditer(line):
            doc, title = docs / m.group(1), m.group(2)
            if doc.is_file() and not any(title.lower() in h.lower() for h in doc_headings(doc)):
                say(lineno, f'{m.group(0)}', f"docs/{m.group(1)} has no heading containing {title!r}")
    return found


def find_problems(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    out = []
    for path in scanned_files(root):
        if path.resolve() in skip:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: holds no reference a reader follows
        out += problems_in(text, path, root)
    return out


def test_every_reference_points_inside_the_checkout():
    # This file is skipped: its probes below are bad references on purpose (they are only ever written to tmp_path).
    problems = find_problems(ROOT, skip=(Path(__file__).resolve(),))
    assert not problems, f"{len(problems)} reference(s) outside the checkout or to nothing:\n" + "\n".join(problems)


def test_the_checkout_is_scanned():
    """The scan sees the code, the docs and the reports (an empty scan would pass anything)."""
    seen = {p.relative_to(ROOT).as_posix() for p in scanned_files(ROOT)}
    for must in ("README.md", "regbench/engine.py", "methods/ses.py", "docs/methods.md", "pyproject.toml",
                 "tests/test_references.py"):
        assert must in seen


# --- the checker catches each kind: probe text written into a fake checkout ---------------------------------

DOTS = "." * 2  # spelled so that this file's own text holds no parent-relative path
SHARE = "sha" + "red"
METHODS_DOC = "# Methods\n\n## 1. SES\n\n### 1.3 Where SES attaches\n\n### 1.4 The Gram trick\n\n## 5. Diagnostics\n\n" \
              "### 5(b) Regularizer\n\n### 7.1 A subsection without its section\n\n## The store is the record\n"

BAD = {
    "parent path to a shared file": f"see {DOTS}/{SHARE}/data/cifar10_subset for the data",
    "parent path to a doc": f"formulas: {DOTS}/{SHARE}/reference/dln.md",
    "parent path to a missing file": f"({DOTS}/README.md)",
    "shared path": f"Facts (see {SHARE}/reference/datasets.md §1)",
    "absolute shared path": f'SUBSET = "/work/{SHARE}/data/x.npz"',
    "DESIGN.md with a section": "the flow (DESIGN" + ".md §2)",
    "DESIGN.md alone": "as DESIGN" + ".md says",
    "bare doc that does not exist": "(dln.md §2.1; Thm 4)",
    "docs/ file that does not exist": "see docs/nowhere.md for more",
    "docs/ section that does not exist": "docs/methods.md §9.2",
    "a subsection heading is not its section": "docs/methods.md §7",
    "range end that does not exist": "docs/methods.md §1.3-1.7",
    "second of a list that does not exist": "docs/methods.md §1.3, §4.4",
    "lettered section that does not exist": "docs/methods.md §5(a)",
    "bare doc, missing section": "methods.md §1.5.",
    "titled heading that does not exist": 'docs/methods.md, "The house"',
    "cited doc outside docs/": "reference/methods.md §1.3",
    "repository file that does not exist": "the protocol (`pkg/study.py`)",
}
GOOD = ("docs/methods.md §1.3 and §1.4 and docs/methods.md §1.3-1.4, §5(b), §1; methods.md §5(b).\n"
        'docs/methods.md, "The store is the record"\n'
        "a/../b and cifar-10-batches-py/../../escaped.txt; "
        f'"benchmark": "{DOTS}/{DOTS}/etc" and "{DOTS}/x"\n'
        f"https://cornell.box.com/{SHARE}/static/abc and leaderboard.md and SES paper §8.4\n"
        "pkg/mod.py, pkg/{name}.py, pkg/test_*.py, runs/sweep/leaderboard.md\n")


def probe_checkout(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "methods.md").write_text(METHODS_DOC, encoding="utf-8")
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text(f'"""Probe.\n\n{text}\n"""\n', encoding="utf-8")
    return root


@pytest.mark.parametrize("kind", sorted(BAD))
def test_checker_catches(tmp_path, kind):
    root = probe_checkout(tmp_path, BAD[kind])
    problems = find_problems(root)
    assert problems, f"{kind}: {BAD[kind]!r} was not reported"
    assert all(p.startswith("pkg/mod.py:3:") for p in problems), problems


@pytest.mark.parametrize("ext", ["md", "sh", "toml", "ini", "cff", "yml"])
def test_checker_reads_every_kind_of_file(tmp_path, ext):
    root = probe_checkout(tmp_path, "nothing here")
    (root / f"notes.{ext}").write_text("see docs/nowhere.md\n", encoding="utf-8")
    assert [p.split(":")[0] for p in find_problems(root)] == [f"notes.{ext}"]


def test_checker_passes_references_that_resolve(tmp_path):
    root = probe_checkout(tmp_path, GOOD)
    assert find_problems(root) == []


def test_output_folders_git_ignores_are_neither_scanned_nor_the_checkout(tmp_path):
    """The Quick start's first command writes runs/ into the checkout; its second (pytest) read README's example
    `runs/sweep/leaderboard.md` as a missing file of the checkout, and scanned the generated leaderboards."""
    root = probe_checkout(tmp_path, "see runs/sweep/leaderboard.md and pkg/gone.py")
    (root / ".gitignore").write_text("/runs/\n", encoding="utf-8")
    (root / "runs" / "sweep").mkdir(parents=True)
    (root / "runs" / "other.md").write_text("see docs/nowhere.md\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    assert [p.split(":", 2)[2] for p in find_problems(root)] == [" 'pkg/gone.py': no such file in the checkout"]
