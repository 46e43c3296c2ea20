"""The run record has one home: no module but regbench/record.py spells a trial or study attribute name, a study name
or a fail-reason prefix. A static check of every module under regbench/, methods/ and datasets/: an attribute read or
written with a string literal (``user_attrs["config"]``, ``set_user_attr("seed", …)``, ``user_attrs={"kind": …}``), a
reason prefix (``"skipped:"``) or a study name built by hand (``f"{name}:{method}:final"``) fails it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "regbench" / "record.py"
ATTR_CONTAINERS = {"user_attrs", "system_attrs"}
SETTERS = {"set_user_attr": 0, "set_system_attr": 0, "set_trial_user_attr": 1, "set_trial_system_attr": 1}
PREFIXES = ("skipped:", "diverged:", "interrupted:", "selected:", "superseded:")


def sources() -> list[Path]:
    files = [p for folder in ("regbench", "methods", "datasets") for p in (ROOT / folder).rglob("*.py")]
    return sorted(p for p in files if p != HOME)


def literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def violations(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', '?')}"
        # user_attrs["name"], system_attrs["name"]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr in ATTR_CONTAINERS and literal(node.slice) is not None:
            found.append(f"{where}: {node.value.attr}[{literal(node.slice)!r}]")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            # user_attrs.get("name"), "name" in user_attrs is a Compare (below)
            owner = node.func.value
            if node.func.attr == "get" and isinstance(owner, ast.Attribute) and owner.attr in ATTR_CONTAINERS \
                    and node.args and literal(node.args[0]) is not None:
                found.append(f"{where}: {owner.attr}.get({literal(node.args[0])!r})")
            index = SETTERS.get(node.func.attr)
            if index is not None and len(node.args) > index and literal(node.args[index]) is not None:
                found.append(f"{where}: {node.func.attr}({literal(node.args[index])!r}, …)")
            for kw in node.keywords:
                if kw.arg in ATTR_CONTAINERS and isinstance(kw.value, ast.Dict) \
                        and any(literal(k) is not None for k in kw.value.keys if k is not None):
                    found.append(f"{where}: {kw.arg}={{…}} with literal keys")
        if isinstance(node, ast.Compare) and any(isinstance(c, ast.Attribute) and c.attr in ATTR_CONTAINERS
                                                 for c in node.comparators) and literal(node.left) is not None:
            found.append(f"{where}: {literal(node.left)!r} in …attrs")
        text = literal(node)
        if text is not None and text.startswith(PREFIXES):
            found.append(f"{where}: reason prefix {text!r}")
        if isinstance(node, ast.JoinedStr):
            parts = "".join(literal(v) or "{}" for v in node.values)
            if parts.endswith(":final") or ":tune:" in parts:
                found.append(f"{where}: study name built by hand ({parts!r})")
    return found


def test_no_module_but_the_record_spells_a_trial_attribute_study_name_or_reason():
    found = [v for path in sources() for v in violations(path)]
    assert not found, "spell these through regbench/record.py:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    't.user_attrs["config"]', 't.user_attrs.get("metrics", {})', 'trial.set_user_attr("seed", 1)',
    'storage.set_trial_user_attr(tid, "fail_reason", "x")', 'study.enqueue_trial({}, user_attrs={"kind": "final"})',
    '"config" in t.user_attrs', 'reason.startswith("skipped:")', 'name = f"{bench}:{method}:final"',
])
def test_the_check_sees_each_way_of_spelling_one(snippet, tmp_path):
    """The checker is live: each spelling it must refuse, written into a module, is found."""
    path = tmp_path / "probe.py"
    path.write_text(snippet + "\n")
    assert violations(path), snippet


def test_no_module_is_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources() + [HOME]
            if (n := len(p.read_text().splitlines())) > 700}
    assert not long, f"split these modules: {long}"


def private_reach(path: Path) -> list[str]:
    """Where ``path`` takes another regbench module's underscore-private name: ``from regbench.x import _y`` or
    ``x._y`` on a regbench module it imported. A room's private names are its own to change."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("regbench", "methods")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
                elif node.module in ("regbench", "methods", "regbench.suites"):
                    modules.add(alias.asname or alias.name)  # `from regbench import stats`: a module
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("regbench"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_takes_another_modules_private_names():
    found = [v for path in sources() + [HOME] for v in private_reach(path)]
    assert not found, "make these public (or keep them in their module):\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", ["from regbench.commands import _load_benchmark",
                                     "from regbench import stats\nstats._ci(x, 0.05)"])
def test_the_private_check_sees_both_ways(snippet, tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(snippet + "\n")
    assert private_reach(path), snippet
